"""Configs: each loads, validates, documents its command, and shards parameters as recorded.

The golden file tests/golden/param_specs.json records every parameter's
PartitionSpec for each config on its own mesh. If you changed a config's
`sharding.params` rules, its mesh, or the model's parameter names ON
PURPOSE, regenerate it with `python tests/test_configs.py --update` and
review the diff; otherwise the test caught an accidental change.
"""

import glob
import json
import os
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, "tests", "golden", "param_specs.json")
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def param_specs(name: str) -> dict:
    from lca.parallel import make_mesh
    from lca.train import config_files, from_config
    from lca.train import state as state_lib

    exp = from_config(config_files.load(os.path.join(REPO, "configs", name + ".py")))
    mesh = make_mesh(dict(exp.mesh), jax.devices()[:8])
    _, abstract, _ = state_lib.abstract_state(exp, mesh)
    flat = jax.tree_util.tree_flatten_with_path(abstract[0])[0]
    return {jax.tree_util.keystr(path): str(leaf.sharding.spec) for path, leaf in flat}


def test_the_four_experiments_exist():
    assert {"passkey", "passkey_xla", "text", "hybrid"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_docstring_gives_the_command_and_smoke_variant_validates(name):
    from lca.train import config_files, from_config, validate

    module = config_files.module(os.path.join(REPO, "configs", name + ".py"))
    assert f"--config configs/{name}.py" in module.__doc__ or name == "passkey"
    assert "Expect" in module.__doc__
    validate(from_config(module.get_config("smoke")), num_devices=8)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_partition_specs_match_the_golden_file(name):
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert name in golden, f"no golden specs for configs/{name}.py; run" \
        " `python tests/test_configs.py --update`"
    assert param_specs(name) == golden[name], (
        f"configs/{name}.py shards its parameters differently from tests/golden/"
        "param_specs.json; if that is intended, run `python tests/test_configs.py --update`")


if __name__ == "__main__" and "--update" in sys.argv:
    jax.config.update("jax_num_cpu_devices", 8)
    with open(GOLDEN, "w") as f:
        json.dump({name: param_specs(name) for name in CONFIGS}, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {GOLDEN}")
