"""Tiny training runs shared by the training, checkpoint and notebook tests (run once per session)."""

import functools
import os
import tempfile

from lca.train import config_files, from_config, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "configs/passkey.py:smoke"


def experiment(spec=SMOKE, **overrides):
    c = config_files.load(os.path.join(REPO, spec))
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_config(c)


@functools.lru_cache(maxsize=None)
def smoke_run():
    """(workdir, RunResult) of the passkey smoke config on its (data=2, sequence=4) mesh."""
    workdir = tempfile.mkdtemp(prefix="lca_smoke_")
    return workdir, train(experiment(), workdir, progress=False, log=lambda *_: None)
