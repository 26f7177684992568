"""Inputs, tolerances and the float64 comparison shared by the attention tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import lca

# Max |kernel - float64 reference| divided by max |reference|, fixed per input
# dtype. Never loosened to make a test pass.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}

MASKS = ("bidirectional", "causal", "window", "segments", "causal_segments")

# The test programs are tiny and compiling them is most of the suite's time:
# LLVM at -O0 halves that. HLO passes (and so collectives, fusions and buffer
# assignment) are unaffected; only the generated machine code is unoptimised.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def random_segments(rng, batch, length, num_segments):
    """Sorted packings: random document boundaries, shared by q and kv."""
    ids = np.sort(rng.integers(0, num_segments, size=(batch, length)), axis=1)
    return jnp.asarray(ids, jnp.int32)


def make_inputs(seed, *, batch=2, q_len=100, kv_len=100, heads=4, kv_heads=2, head_dim=16,
                dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, head_dim))
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
    v = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
    ct = rng.standard_normal((batch, q_len, heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(ct, jnp.float32),)


def mask_kwargs(name, seed, batch, q_len, kv_len):
    """Keyword arguments of one named mask case.

    Segment cases draw q and kv packings independently, so some queries have
    no key of their segment (rows that see nothing) and documents cross tile
    boundaries.
    """
    rng = np.random.default_rng(seed + 1000)
    if name == "bidirectional":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "window":
        return {"causal": True, "window": 19}
    seg = {"segment_ids": random_segments(rng, batch, q_len, 5),
           "kv_segment_ids": random_segments(rng, batch, kv_len, 5)}
    if name == "segments":
        return seg
    if name == "causal_segments":
        return {"causal": True, **seg}
    raise KeyError(name)


def outputs_and_grads(fn, q, k, v, ct):
    """fn's output and the gradients of <output, ct> with respect to q, k, v."""
    def loss(q, k, v):
        out = fn(q, k, v)
        return (out.astype(ct.dtype) * ct).sum(), out
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def compiled_outputs_and_grads(fn, q, k, v, ct):
    """outputs_and_grads as one program (output and gradients), compiled with FAST_COMPILE."""
    return jax.jit(functools.partial(outputs_and_grads, fn),
                   compiler_options=FAST_COMPILE)(q, k, v, ct)


def reference_outputs_and_grads(q, k, v, ct, **kwargs):
    f64 = lambda x: x.astype(jnp.float64)
    fn = lambda q, k, v: lca.attention(q, k, v, impl="reference", **kwargs)
    return compiled_outputs_and_grads(fn, f64(q), f64(k), f64(v), f64(ct))


def relative_error(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values in the kernel's result"
    return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)


def assert_matches_reference(got, ref, dtype, what=""):
    tol = TOLERANCE[dtype]
    for name, g, r in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (ref[0], *ref[1])):
        err = relative_error(g, r)
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol:g}"
