"""lca: exact and linear attention over long contexts, on one device or a mesh."""

from lca import kernels, layouts
from lca.attention import attention
from lca.kernels.linear import linear_attention, linear_attention_step
from lca.parallel.sequence import sequence_parallel_attention

__all__ = ["attention", "linear_attention", "linear_attention_step",
           "kernels", "layouts", "sequence_parallel_attention", "load", "generate"]
__version__ = "0.1.0"


def load(workdir, step=None, mesh=None):
    """`(model, config, step)` from a training run's checkpoint, restored onto `mesh`
    (default: one CPU device). See `lca.train.checkpoint.load`."""
    from lca.train.checkpoint import load as _load  # Flax/Orbax only when asked for
    return _load(workdir, step=step, mesh=mesh)


def generate(model, prompt_BT, steps, **options):
    """int32 [B, steps]: the model's continuation of each prompt, through a KV cache on one
    device or sharded over `mesh=`. See `lca.generation.generate` for every option."""
    from lca.generation import generate as _generate  # Flax only when asked for
    return _generate(model, prompt_BT, steps, **options)
