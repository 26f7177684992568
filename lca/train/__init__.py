"""Training and evaluation: config -> frozen dataclasses, the loop, checkpoints, `load`.

`ml_collections` stops here: `from_config` turns a ConfigDict into an
`Experiment` of frozen dataclasses that everything below works with.
"""

from lca.train.checkpoint import load
from lca.train.config import Experiment, from_config, validate
from lca.train.evaluate import Evaluator, evaluate_checkpoint
from lca.train.loop import run_mesh, setup_devices, summary, train

__all__ = ["Evaluator", "evaluate_checkpoint", "Experiment", "from_config", "validate", "load", "run_mesh", "setup_devices",
           "summary", "train"]
