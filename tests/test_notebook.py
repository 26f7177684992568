"""The checkpoint notebook runs end to end on a tiny checkpoint (written on a (2, 4) mesh)."""

import os

import nbformat
from nbclient import NotebookClient

from train_runs import REPO, smoke_run

NOTEBOOK = os.path.join(REPO, "experiments", "notebooks", "explore_checkpoint.ipynb")


def test_explore_checkpoint_notebook_executes(monkeypatch):
    workdir, _ = smoke_run()
    monkeypatch.setenv("LCA_WORKDIR", workdir)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "step 8:" in text and "eval/accuracy" in text and "model says" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the attention map was not drawn"
