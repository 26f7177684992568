"""lca.sequence_parallel_attention: the all-gather baseline, layout-order entry, bad input."""

import functools
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (TOLERANCE, make_inputs, outputs_and_grads,
                             reference_outputs_and_grads, relative_error)
from ring_cases import HEADS, check_against_reference, mask_kwargs, sub_mesh

import lca
from lca import layouts
from lca.kernels import registry
from lca.parallel import attention_in_layout


def test_allgather_on_data_by_sequence_mesh(mesh2x4):
    check_against_reference(mesh2x4, "zigzag", "causal", HEADS["gqa"], impl="allgather")


def test_attention_in_layout_takes_per_example_positions(mesh2x4):
    """Layout-order arrays and [B, T] positions in, layout order out: what a model calls."""
    n, seq_len = 4, 64
    q, k, v, ct = make_inputs(21, batch=2, q_len=seq_len, kv_len=seq_len, heads=4, kv_heads=2,
                              head_dim=8)
    # Example 1 is shifted by 100 positions: only differences matter to the mask.
    natural_pos = jnp.arange(seq_len)[None] + jnp.array([[0], [100]])
    kwargs = mask_kwargs("causal_segments", 21, 2, seq_len) | {"window": 21}
    perm = functools.partial(layouts.permute, layout="zigzag", num_shards=n)

    def fn(q, k, v):
        out = attention_in_layout(perm(q), perm(k), perm(v), mesh=mesh2x4,
                                  positions=perm(natural_pos), block_q=4, block_k=4,
                                  **{**kwargs, "segment_ids": perm(kwargs["segment_ids"])})
        return layouts.unpermute(out, "zigzag", n)

    got = outputs_and_grads(jax.jit(fn), q, k, v, ct)
    ref = reference_outputs_and_grads(q, k, v, ct, **kwargs)
    for g, r in zip((got[0], *got[1]), (ref[0], *ref[1])):
        assert relative_error(g, r) <= TOLERANCE[jnp.float32]


def test_linear_impl_is_delegated_with_tokens_and_per_token_decay_permuted(monkeypatch, mesh8):
    calls = []

    def fake(q, k, v, *, mesh, axis, layout, positions=None, **options):
        calls.append(dict(q=q, layout=layout, axis=axis, positions=positions, **options))
        return q * 2

    module = types.ModuleType("lca.parallel.linear")
    module.attention_in_layout_linear = fake
    monkeypatch.setitem(sys.modules, "lca.parallel.linear", module)
    monkeypatch.setattr(lca.parallel, "linear", module, raising=False)
    x = jnp.arange(2 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 3, 1)
    decay_tokens = -jnp.arange(2 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 3)
    decay_heads = -jnp.ones(3)
    for decay in (decay_tokens, decay_heads):
        out = lca.sequence_parallel_attention(x, x, x, mesh=mesh8, impl="linear",
                                              layout="zigzag", log_decay=decay, chunk_size=4)
        np.testing.assert_array_equal(out, 2 * x)  # permuted there and back
    perm = functools.partial(layouts.permute, layout="zigzag", num_shards=8)
    np.testing.assert_array_equal(calls[0]["q"], perm(x))
    np.testing.assert_array_equal(calls[0]["log_decay"], perm(decay_tokens))
    np.testing.assert_array_equal(calls[1]["log_decay"], decay_heads)
    assert calls[0]["layout"] == "zigzag" and calls[0]["axis"] == "sequence"
    assert calls[0]["chunk_size"] == 4
    attention_in_layout(x, x, x, mesh=mesh8, impl="linear", layout="contiguous", positions=None)
    assert calls[-1]["layout"] == "contiguous"


def _call(mesh=None, *, batch=2, seq_len=64, heads=4, kv_heads=2, **kwargs):
    mesh = mesh or sub_mesh(4)
    q = jnp.zeros((batch, seq_len, heads, 8))
    kv = jnp.zeros((batch, seq_len, kv_heads, 8))
    return lca.sequence_parallel_attention(q, kv, kv, mesh=mesh, **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"impl": "dense"}, r"unknown sequence-parallel impl 'dense'; known: "
                        + re.escape(str(registry.names("strategy") + registry.names("linear")))),
    ({"local": "flash"}, r"unknown local kernel 'flash'; known: "
                         + re.escape(str(registry.names("local")))),
    ({"local": "xla"}, r"local kernel 'xla' does not support strategy 'ring' \(it gives no"
                       r" log-sum-exp.*would work: \['blockwise', 'reference'\]"),
    ({"layout": "spiral"}, r"layout must be one of \['contiguous', 'striped', 'zigzag'\]"),
    ({"axis": "seq"}, r"axis='seq' is not an axis of the mesh; its axes are \['sequence'\]"),
    ({"seq_len": 60}, r"sequence length 60 does not fit layout='zigzag' over 4 shards: it must be"
                      r" a multiple of 2 \* num_shards = 8 chunks; nearest valid lengths: \[56, 64\]"),
    ({"seq_len": 30, "layout": "contiguous"}, r"nearest valid lengths: \[28, 32\]"),
    ({"seq_len": 72, "layout": "striped", "stripe": 8},
     r"multiple of num_shards \* stripe = 4 \* 8 = 32; nearest valid lengths: \[64, 96\]"),
    ({"window": 8}, r"window=8 needs causal=True"),
    ({"causal": True, "window": 0}, r"window must be an integer >= 1"),
    ({"heads": 6, "kv_heads": 4}, r"q heads \(6\) must be a multiple of kv_heads \(4\)"),
    ({"block_q": 0}, r"block_q must be a positive integer"),
    ({"blocks": 8}, r"unknown option\(s\) \['blocks'\].*valid options: \['block_q', 'block_k', 'stripe'\]"),
])
def test_bad_input_names_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(**kwargs)


def test_bad_input_against_the_mesh(mesh2x2x2):
    with pytest.raises(ValueError, match=r"kv_heads 3 does not divide by the mesh axes"
                                         r" \['tensor'\] of size 2 that split the 6 query heads;"
                                         r" nearest valid kv_heads: \[2, 4\]"):
        _call(mesh2x2x2, heads=6, kv_heads=3)
    with pytest.raises(ValueError, match=r"sequence length 30 does not fit layout='zigzag' over"
                                         r" 2 shards.*nearest valid lengths: \[28, 32\]"):
        _call(mesh2x2x2, seq_len=30)


def test_a_batch_or_heads_that_do_not_divide_their_axes_are_replicated(mesh2x4, mesh2x2x2):
    """As the model's activation constraints do (one set of rules places both)."""
    check_against_reference(mesh2x4, "zigzag", "causal", 2, batch=3, fast_compile=True)
    check_against_reference(mesh2x2x2, "striped", "causal", 1, heads=3, fast_compile=True)


def test_bad_input_raises_before_compiling(mesh8, monkeypatch):
    def no_shard_map(*args, **kwargs):
        raise AssertionError("reached shard_map")

    monkeypatch.setattr(jax, "shard_map", no_shard_map)
    with pytest.raises(ValueError, match="nearest valid lengths"):
        _call(mesh8, seq_len=40)


def test_key_length_must_equal_query_length():
    q, kv = jnp.zeros((2, 64, 4, 8)), jnp.zeros((2, 32, 2, 8))
    with pytest.raises(ValueError, match="k/v length 32 must equal q length 64"):
        lca.sequence_parallel_attention(q, kv, kv, mesh=sub_mesh(4))
