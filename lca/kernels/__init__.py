"""Pure attention kernels: functions of arrays and static options, no Flax, no mesh."""

from lca.kernels.allgather import allgather_attention
from lca.kernels.blockwise import blockwise_attention
from lca.kernels.masks import MaskSpec
from lca.kernels.reference import reference_attention
from lca.kernels.ring import ring_attention
from lca.kernels.xla import xla_attention

__all__ = ["blockwise_attention", "reference_attention", "xla_attention", "MaskSpec",
           "ring_attention", "allgather_attention"]
