"""Pure attention kernels: functions of arrays and static options, no Flax, no mesh."""

from lca.kernels.allgather import allgather_attention
from lca.kernels.blockwise import blockwise_attention
from lca.kernels.feature_maps import elu1, hedgehog, hedgehog_identity, relu, taylor2
from lca.kernels.linear import linear_attention, linear_attention_step
from lca.kernels.linear_parallel import linear_attention_shard
from lca.kernels.masks import MaskSpec
from lca.kernels.reference import reference_attention
from lca.kernels.ring import ring_attention
from lca.kernels.xla import xla_attention

__all__ = ["blockwise_attention", "reference_attention", "xla_attention", "MaskSpec",
           "linear_attention", "linear_attention_step", "linear_attention_shard",
           "elu1", "relu", "taylor2", "hedgehog", "hedgehog_identity",
           "ring_attention", "allgather_attention"]
