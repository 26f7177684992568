"""The float64 recurrence, inputs and comparisons shared by the linear-attention tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention_cases import FAST_COMPILE, TOLERANCE, relative_error

DECAYS = ("none", "head", "token")


def jit(fn, **kwargs):
    """jax.jit with FAST_COMPILE."""
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def reference(q, k, v, log_decay=None, *, normalize=False, initial_state=None,
              segment_ids=None):
    """The recurrence token by token, written out plainly; float64 in, float64 out.

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ, z_t = exp(g_t) z_{t-1} + k_t,
    o_t = S_tᵀ q_t (/ q_t · z_t with normalize). Returns (out, final state),
    the state packed as the kernel documents: [S | z] with normalize. k and v
    may have fewer heads (grouped queries; repeated here). With segment_ids
    [B, T], S and z are set to zero before a token whose id differs from the
    previous token's.
    """
    groups = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    g = jnp.zeros((b, t, h), q.dtype) if log_decay is None else jnp.broadcast_to(
        log_decay, (b, t, h))
    s0 = jnp.zeros((b, h, dk, dv), q.dtype) if initial_state is None else initial_state[..., :dv]
    z0 = jnp.zeros((b, h, dk), q.dtype)
    if normalize and initial_state is not None:
        z0 = initial_state[..., dv]

    starts = jnp.zeros((b, t), bool) if segment_ids is None else jnp.concatenate(
        [jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

    def step(carry, x):
        s, z = carry
        q_t, k_t, v_t, g_t, start = x
        s, z = (jnp.where(start.reshape((b,) + (1,) * (y.ndim - 1)), 0, y) for y in (s, z))
        decay = jnp.exp(g_t)
        s = decay[..., None, None] * s + k_t[..., :, None] * v_t[..., None, :]
        z = decay[..., None] * z + k_t
        o = jnp.einsum("bhk,bhkv->bhv", q_t, s)
        if normalize:
            o = o / jnp.einsum("bhk,bhk->bh", q_t, z)[..., None]
        return (s, z), o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, starts))
    (s, z), out = jax.lax.scan(step, (s0, z0), xs)
    state = jnp.concatenate([s, z[..., None]], axis=-1) if normalize else s
    return jnp.moveaxis(out, 0, 1), state


def make_inputs(seed, *, batch=2, length=75, heads=3, key_dim=8, value_dim=6, decay="token",
                normalize=False, dtype=jnp.float32, kv_heads=None, documents=0):
    """q, k, v, log_decay, initial_state, the two cotangents and segment_ids, as a dict.

    kv_heads: k and v heads (default `heads`). documents: 0 for no segment ids,
    else int32 [B, T] ids of that many documents per row at random boundaries
    (each row its own), so documents cross chunks and shards. With normalize,
    q and k are positive (elu + 1 features) and so is the initial key sum, as
    they would be from a positive feature map.
    """
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape)
    kv_heads = kv_heads or heads
    q, k = normal(batch, length, heads, key_dim), normal(batch, length, kv_heads, key_dim)
    if normalize:
        q, k = (np.where(x > 0, x + 1, np.exp(x)) for x in (q, k))
    state = normal(batch, heads, key_dim, value_dim + int(normalize))
    if normalize:
        state[..., -1] = np.abs(state[..., -1]) + 1
    log_decay = {"none": None,
                 "head": -rng.uniform(0.01, 0.3, heads),
                 "token": -rng.uniform(0.0, 0.4, (batch, length, heads))}[decay]
    cast = lambda x: None if x is None else jnp.asarray(x, dtype)
    inputs = {"q": cast(q), "k": cast(k),
              "v": cast(normal(batch, length, kv_heads, value_dim)),
              "log_decay": None if log_decay is None else jnp.asarray(log_decay, jnp.float32),
              "initial_state": jnp.asarray(state, jnp.float32),
              "ct_out": jnp.asarray(normal(batch, length, heads, value_dim), jnp.float32),
              "ct_state": jnp.asarray(state[::-1] * 0.5, jnp.float32), "segment_ids": None}
    if documents:  # drawn last: the other inputs do not depend on it
        cuts = [np.sort(rng.choice(np.arange(1, length), documents - 1, replace=False))
                for _ in range(batch)]
        inputs["segment_ids"] = jnp.asarray(np.stack(
            [np.searchsorted(c, np.arange(length), side="right") for c in cuts]), jnp.int32)
    return inputs


GRAD_NAMES = ("q", "k", "v", "log_decay", "initial_state")


def outputs_and_grads(fn, inputs):
    """fn(q, k, v, log_decay, initial_state) -> (out, state); both and the gradients of

    <out, ct_out> + <state, ct_state> with respect to every input that is not None.
    """
    names = [n for n in GRAD_NAMES if inputs[n] is not None]

    def loss(*args):
        kwargs = dict(zip(names, args))
        out, state = fn(**{n: kwargs.get(n) for n in GRAD_NAMES})
        ct_out, ct_state = (inputs[n].astype(state.dtype) for n in ("ct_out", "ct_state"))
        return (out.astype(state.dtype) * ct_out).sum() + (state * ct_state).sum(), (out, state)

    grad = jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    (_, (out, state)), grads = grad(*(inputs[n] for n in names))
    return out, state, dict(zip(names, grads))


@functools.lru_cache(maxsize=None)
def reference_results(seed, decay, normalize, **shape):
    """Float64 reference outputs, final state and gradients of one input case (cached)."""
    inputs = make_inputs(seed, decay=decay, normalize=normalize, **dict(shape))
    f64 = {n: (None if x is None or n == "segment_ids" else x.astype(jnp.float64))
           for n, x in inputs.items()}
    fn = lambda q, k, v, log_decay, initial_state: reference(
        q, k, v, log_decay, normalize=normalize, initial_state=initial_state,
        segment_ids=inputs["segment_ids"])
    return outputs_and_grads(fn, f64)


def assert_close(got, ref, dtype, what=""):
    """Every array of (out, state, grads) within the dtype's fixed relative tolerance."""
    tol = TOLERANCE[dtype]
    pairs = [("out", got[0], ref[0]), ("state", got[1], ref[1])]
    pairs += [(f"d{name}", got[2][name], ref[2][name]) for name in ref[2]]
    for name, g, r in pairs:
        assert np.shape(g) == np.shape(r), f"{what} {name}: shape {np.shape(g)} != {np.shape(r)}"
        err = relative_error(g, r)
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol:g}"
