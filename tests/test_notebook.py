"""The checkpoint notebook runs end to end, by the README's command, on a tiny checkpoint
(written on a (2, 4) mesh)."""

import os
import subprocess
import sys

import nbformat

from train_runs import REPO, smoke_run

NOTEBOOK = os.path.join("experiments", "notebooks", "explore_checkpoint.ipynb")
# The README's instruction, in the environment it says to enter (.venv/bin on PATH).
COMMAND = ["jupyter", "nbconvert", "--to", "notebook", "--execute", NOTEBOOK, "--output-dir"]


def test_explore_checkpoint_notebook_executes(tmp_path):
    workdir, _ = smoke_run()
    env = dict(os.environ, LCA_WORKDIR=workdir,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    result = subprocess.run(COMMAND + [str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    nb = nbformat.read(tmp_path / os.path.basename(NOTEBOOK), as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "step 8:" in text and "eval/accuracy" in text and "model says" in text
    code = "".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "lca.generate(" in code  # the continuation goes through the KV cache
    assert "read only" not in text + result.stderr  # Orbax's warning on every load is quieted
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the attention map was not drawn"
