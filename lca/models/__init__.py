"""Flax NNX models. Attention layers name a kernel (see `lca.models.kernels`), never implement one."""

from lca.models import kernels
from lca.models.config import LinearOptions, ModelConfig, SparseOptions
from lca.models.transformer import Transformer, cross_entropy

__all__ = ["kernels", "LinearOptions", "ModelConfig", "SparseOptions", "Transformer",
           "cross_entropy"]
