"""Bad input raises a ValueError naming the argument, before anything is traced."""

import jax.numpy as jnp
import pytest

import lca

Q = jnp.zeros((2, 16, 4, 8))
KV = jnp.zeros((2, 16, 2, 8))
SEG = jnp.zeros((2, 16), jnp.int32)


@pytest.mark.parametrize("impl", ["blockwise", "xla", "reference"])
@pytest.mark.parametrize("args, kwargs, message", [
    ((Q[0], KV, KV), {}, r"q must be \[batch, len, heads, head_dim\]"),
    ((Q, KV[..., 0], KV), {}, r"k must be \[batch, len, heads, head_dim\]"),
    ((Q, KV, KV[:, :8]), {}, "v must have k's shape"),
    ((Q, KV[:1], KV[:1]), {}, "k batch 1 must equal q batch 2"),
    ((Q, KV[..., :4], KV[..., :4]), {}, "k head_dim 4 must equal q head_dim 8"),
    ((Q, jnp.zeros((2, 16, 3, 8)), jnp.zeros((2, 16, 3, 8))), {},
     r"q heads \(4\) must be a multiple of kv_heads \(3\).*\[1, 2, 4\]"),
    ((Q.astype(jnp.int32), KV, KV), {}, "q must be a floating dtype"),
    ((Q, KV, KV), {"segment_ids": SEG.astype(jnp.float32)}, "segment_ids must be integers"),
    ((Q, KV, KV), {"segment_ids": SEG[:, :8]}, r"segment_ids must have shape \[batch, len\]"),
    ((Q, KV, KV), {"segment_ids": SEG, "kv_segment_ids": SEG[:1]}, "kv_segment_ids must have shape"),
    ((Q, KV, KV), {"kv_segment_ids": SEG}, "kv_segment_ids needs segment_ids"),
    ((Q, KV, KV), {"positions": jnp.arange(15)}, "positions must have shape"),
    ((Q, KV, KV), {"kv_positions": jnp.zeros(16)}, "kv_positions must be integers"),
    ((Q, KV, KV), {"window": 4}, "window=4 needs causal=True"),
    ((Q, KV, KV), {"causal": True, "window": 0}, "window must be an integer >= 1"),
    ((Q, KV, KV), {"causal": True, "window": 2.5}, "window must be an integer >= 1"),
])
def test_bad_arguments_are_named(impl, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lca.attention(*args, impl=impl, **kwargs)


def test_unknown_impl_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown local kernel 'flash'; known: \['blockwise',"
                                         r" 'reference', 'xla', 'splash', 'pallas_gpu'\]"):
        lca.attention(Q, KV, KV, impl="flash")


@pytest.mark.parametrize("name", ["block_q", "block_k"])
@pytest.mark.parametrize("value", [0, -3, 2.0])
def test_block_sizes_must_be_positive_integers(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        lca.attention(Q, KV, KV, **{name: value})


@pytest.mark.parametrize("q,k,message", [
    (Q.astype(jnp.float16), KV.astype(jnp.float16), r"q must be float32 or bfloat16 .*got float16"),
    (Q.astype(jnp.float32), KV.astype(jnp.bfloat16),
     r"q, k, v must share one dtype; got q float32, k bfloat16"),
])
def test_dtypes_outside_the_contract_are_refused(q, k, message):
    with pytest.raises(ValueError, match=message):
        lca.attention(q, k, k)
    with pytest.raises(ValueError, match=message):
        lca.sequence_parallel_attention(q, k, k, mesh=lca.parallel.make_mesh({"sequence": 8}))


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_a_misspelled_argument_is_named_with_the_valid_ones(impl):
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['casual'\] \(did you mean"
                                         r" causal\?\); it takes impl, causal, window"):
        lca.attention(Q, KV, KV, impl=impl, casual=True)
