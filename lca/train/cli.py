"""What lca's command lines share: refusals on one line, config overrides checked by name.

Every refusal (a config name or value, a mesh, the distributed settings, a
workdir that holds another run) is printed as `error: <what, where, what
would be valid>` on one line of stderr, and the command exits 2 with no
traceback; set LCA_TRACEBACK=1 to see it. `run(main)` wraps `absl.app.run`
this way; `check_overrides` catches a misspelled `--config.a.b` before
ml_collections does, naming the options of that section.
"""

from __future__ import annotations

import difflib
import os
import sys

TRACEBACK_ENV = "LCA_TRACEBACK"
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def refuse(message: str, code: int = 2):
    """Prints `error: message` (one line) to stderr and exits with `code`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def _flag_value(argv, name):
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _near(word, choices):
    """The choice `word` most likely meant: one it begins, or a close spelling."""
    starts = [c for c in choices if c.startswith(word)]
    return starts[:1] or difflib.get_close_matches(word, choices, n=1)


def _unknown(path, node):
    keys = sorted(node.keys())
    near = _near(path[-1], keys)
    hint = f"; did you mean {'.'.join(path[:-1] + [near[0]])}?" if near else ""
    section = ".".join(path[:-1])
    return (f"unknown option {'.'.join(path)}; {section} has: {', '.join(keys)}{hint}")


def check_overrides(argv, flag="config"):
    """Raises a ValueError for a `--config.x.y=...` that names no option of the config."""
    spec = _flag_value(argv, flag)
    if spec is None:
        return
    from ml_collections import ConfigDict

    from lca.train import config_files

    path = spec.partition(":")[0]
    if not os.path.exists(path):
        raise ValueError(f"--{flag}: no config file at {path!r}")
    config = config_files.load(spec)
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        keys = [flag] + arg[2 + len(flag) + 1:].split("=", 1)[0].split(".")
        node = config
        for i, key in enumerate(keys[1:], start=2):
            if not isinstance(node, ConfigDict) or key not in node:
                raise ValueError(_unknown(keys[:i], node) if isinstance(node, ConfigDict)
                                 else f"{'.'.join(keys[:i - 1])} has no options; got"
                                 f" {'.'.join(keys[:i])}")
            node = node[key]


def parse_mesh(text: str | None) -> dict | None:
    """'data=2,sequence=4' -> {'data': 2, 'sequence': 4}; None stays None."""
    if text is None:
        return None
    sizes = {}
    for part in text.split(","):
        axis, sep, size = part.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE...] with axes from"
                             f" {', '.join(MESH_AXES)}, e.g. data=2,sequence=4")
        if axis.strip() not in MESH_AXES:
            near = _near(axis.strip(), MESH_AXES)
            raise ValueError(f"--mesh: unknown axis {axis.strip()!r}; axes: {', '.join(MESH_AXES)}"
                             + (f" (did you mean {near[0]}?)" if near else ""))
        sizes[axis.strip()] = int(size)
    return sizes


def run(main, *, config_flag: str | None = "config", argv=None):
    """`absl.app.run(main)` with flag errors, config-name errors and every ValueError the
    command raises reported on one line (exit 2)."""
    from absl import app, flags

    debug = bool(os.environ.get(TRACEBACK_ENV))

    def parse(argv):
        try:
            if config_flag:
                check_overrides(argv, config_flag)
            return flags.FLAGS(argv)
        except (flags.Error, ValueError, AttributeError, KeyError, TypeError) as e:
            if debug:
                raise
            refuse(e)

    def guarded(argv):
        try:
            return main(argv)
        except ValueError as e:
            if debug:
                raise
            refuse(e)
        except FloatingPointError as e:
            if debug:
                raise
            refuse(e, code=1)

    app.run(guarded, argv=argv, flags_parser=parse)
