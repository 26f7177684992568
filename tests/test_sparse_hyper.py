"""HyperAttention: exact where its residual is covered, better with more samples, checked inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lca
from lca.sparse.hyper import hyper_attention
from tests.attention_cases import (FAST_COMPILE, TOLERANCE, assert_matches_reference,
                                   compiled_outputs_and_grads, make_inputs,
                                   reference_outputs_and_grads, relative_error)

KEY = jax.random.key(0)


# min_seq_len 25 runs the causal recursion (99 tokens: two levels over leaves of 25, padded
# to 100) and the non-causal estimate, not their exact shortcuts. Lengths are not multiples
# of the block: 100 keys make 7 blocks of 14 or 15, 60 queries 7 of 8 or 9.
# block 16, sample 100: every key outside a block is taken once, with weight 1;
# block = the key length, sample 8: one block holds every key, so there is no residual.
@pytest.mark.parametrize("causal, q_len, kv_len, block, sample_size", [
    (True, 99, 99, 16, 99), (True, 99, 99, 99, 8),
    (False, 100, 100, 16, 100), (False, 100, 100, 100, 8), (False, 60, 100, 16, 100)])
def test_exact_when_the_residual_is_covered(causal, q_len, kv_len, block, sample_size):
    q, k, v, ct = make_inputs(0, q_len=q_len, kv_len=kv_len, heads=4, kv_heads=2)
    fn = functools.partial(hyper_attention, causal=causal, block=block,
                           sample_size=sample_size, key=KEY, min_seq_len=25)
    got = compiled_outputs_and_grads(fn, q, k, v, ct)
    ref = reference_outputs_and_grads(q, k, v, ct, causal=causal)
    assert_matches_reference(got, ref, jnp.float32, f"causal={causal} q_len={q_len}")


def test_error_shrinks_as_the_sample_grows():
    """Causal, T = 512, block 64, exact leaves of 256: the second half's 256 queries see the
    first half's 256 keys in 4 blocks, 192 keys outside each; 512 samples cover them.

    The error is the Frobenius norm of out - exact over that of exact, averaged over 4 keys
    (the max-entry error of one draw is too noisy to rank 32 against 128 samples).
    """
    q, k, v, _ = make_inputs(0, batch=1, q_len=512, kv_len=512, heads=2, kv_heads=1)
    q = 2.0 * q  # peaked rows: the block diagonal holds much of the mass
    ref = lca.attention(q.astype(jnp.float64), k.astype(jnp.float64), v.astype(jnp.float64),
                        impl="reference", causal=True)
    keys = jax.random.split(KEY, 4)
    error, outs = {}, {}
    for m in (32, 128, 512):
        fn = functools.partial(hyper_attention, causal=True, block=64, sample_size=m,
                               min_seq_len=256)
        outs[m] = jax.jit(jax.vmap(lambda key: fn(q, k, v, key=key)),
                          compiler_options=FAST_COMPILE)(keys)
        error[m] = np.mean([frobenius_error(out, ref) for out in outs[m]])
    assert error[32] > error[128] > error[512], error
    assert max(relative_error(out, ref) for out in outs[512]) <= TOLERANCE[jnp.float32]


def frobenius_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def test_residual_denominator_is_unbiased():
    """exp(lse) estimates the softmax denominator: its mean over 64 keys is the exact one.

    Non-causal, 256 keys in 8 blocks of 32, 16 of the 224 outside keys drawn per block, so
    the residual (most of each row's mass) is weighted 224 / 16; dropping that weight, or
    drawing keys of the block again, moves the mean far outside 3%.
    """
    q, k, v, _ = make_inputs(2, batch=1, q_len=256, kv_len=256)
    _, lse = lca.attention(q, k, v, impl="reference", return_lse=True)
    fn = functools.partial(hyper_attention, causal=False, block=32, sample_size=16,
                           min_seq_len=32, return_lse=True)
    keys = jax.random.split(KEY, 64)
    _, lse_hat = jax.jit(jax.vmap(lambda key: fn(q, k, v, key=key)),
                         compiler_options=FAST_COMPILE)(keys)
    ratio = np.exp(np.asarray(lse_hat, np.float64) - np.asarray(lse, np.float64))
    assert abs(ratio.mean() - 1) < 0.03, ratio.mean()


def test_same_key_same_result_and_dtype_kept():
    q, k, v, _ = make_inputs(1, batch=1, q_len=96, kv_len=96, dtype=jnp.bfloat16)
    fn = jax.jit(functools.partial(hyper_attention, block=16, sample_size=8, min_seq_len=48),
                 compiler_options=FAST_COMPILE)
    first, again = fn(q, k, v, key=KEY), fn(q, k, v, key=KEY)
    assert first.dtype == jnp.bfloat16 and first.shape == q.shape
    np.testing.assert_array_equal(np.asarray(first, np.float32), np.asarray(again, np.float32))
    assert np.all(np.isfinite(np.asarray(first, np.float32)))


Q = jnp.zeros((1, 32, 4, 8))
KV = jnp.zeros((1, 32, 2, 8))


@pytest.mark.parametrize("args, kwargs, message", [
    ((Q, KV, KV), {"block": 0}, "block must be a positive integer"),
    ((Q, KV, KV), {"block": 2.5}, "block must be a positive integer"),
    ((Q, KV, KV), {"block": True}, "block must be a positive integer"),
    ((Q, KV, KV), {"sample_size": -4}, "sample_size must be a positive integer"),
    ((Q, KV, KV), {"sample_size": "8"}, "sample_size must be a positive integer"),
    ((Q, KV, KV), {"block": 33}, "block 33 does not fit the key length 32"),
    ((Q, KV, KV), {"block": 8, "sample_size": 64}, "sample_size 64 does not fit the key length 32"),
    ((Q, KV, KV), {"min_seq_len": 0}, "min_seq_len must be a positive integer"),
    ((Q, KV, KV), {"lsh_bits": 17}, "lsh_bits must be at most 16"),
    ((Q, KV, KV), {"key": None}, "key must be a jax.random key"),
    ((Q, KV, KV), {"key": jnp.zeros(3, jnp.uint32)}, "key must be one jax.random key"),
    ((Q[0], KV, KV), {}, r"q must be \[batch, len, heads, head_dim\]"),
    ((Q, KV[..., 0], KV), {}, r"k must be \[batch, len, heads, head_dim\]"),
    ((Q, KV[:, :16], KV[:, :16]), {}, "k length 16 must equal q length 32"),
    ((Q, jnp.zeros((1, 32, 3, 8)), jnp.zeros((1, 32, 3, 8))), {},
     r"q heads \(4\) must be a multiple of kv_heads \(3\)"),
])
def test_bad_arguments_are_named(args, kwargs, message):
    kwargs = {"key": KEY, "block": 8, "sample_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        hyper_attention(*args, **kwargs)
