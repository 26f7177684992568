"""Pure attention kernels: functions of arrays and static options, no Flax, no mesh.

`registry` is the one table of them: local kernels (what runs on the tokens
a device holds), strategies (how a sharded sequence is distributed) and the
linear family.
"""

from lca.kernels import registry
from lca.kernels.allgather import allgather_attention
from lca.kernels.feature_maps import elu1, hedgehog, hedgehog_identity, relu, taylor2
from lca.kernels.linear import linear_attention, linear_attention_step
from lca.kernels.linear_parallel import linear_attention_shard
from lca.kernels.local import LocalConfig, LocalKernel, Supports
from lca.kernels.masks import MaskSpec
from lca.kernels.reference import reference_attention
from lca.kernels.ring import ring_attention
from lca.kernels.ulysses import ulysses_attention, usp_attention
from lca.kernels.xla import xla_attention

__all__ = ["registry", "LocalKernel", "LocalConfig", "Supports", "MaskSpec",
           "reference_attention", "xla_attention", "ring_attention", "allgather_attention",
           "ulysses_attention", "usp_attention",
           "linear_attention", "linear_attention_step", "linear_attention_shard",
           "elu1", "relu", "taylor2", "hedgehog", "hedgehog_identity"]
