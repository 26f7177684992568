"""Causal linear attention with decay: chunked, recurrent and quadratic forms, one decoding step.

Dimension legend:
  B batch, T length, H query heads, J key/value heads (H % J == 0: grouped
  query heads share k and v, which are never repeated), K key_dim, V value_dim.

Per query head h (reading key/value head h // (H / J)), with g_t = log_decay_t
<= 0 per query head and q, k already through a feature map:

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ          state [K, V]
    o_t = S_tᵀ q_t                             (normalize=False)
    z_t = exp(g_t) z_{t-1} + k_t               key-sum [K]
    o_t = S_tᵀ q_t / (q_t · z_t)               (normalize=True)

State layout. Without `normalize` a state is [B, H, K, V]. With `normalize`
it is [B, H, K, V + 1]: columns :V hold S and column V holds z. That is
exactly the state of the same recurrence run on v with a column of ones
appended, which is how every impl computes it, so the state stays one array
in the scan carry, across a mesh axis and in a decoding cache. States are
float32 (float64 when the inputs are float64), whatever the input dtype.

Packed documents. With `segment_ids` [B, T] the state restarts where the id
changes from one token to the next: a document's first token t sees
S_t = k_t v_tᵀ (and z_t = k_t), nothing of the tokens before it. Every impl
runs this as a decay: g_t = RESET_LOG_DECAY at a document's first token, so
exp of every exponent that spans a boundary is exactly zero in float32 and
float64, while no exponent that stays inside a document changes. The first
token of the sequence never restarts (an `initial_state` flows into it), and
the gradient to log_decay at a restarting token is zero (its decay
multiplies nothing).

A normalized query whose denominator q_t · z_t is exactly zero gets zeros
(with a non-negative feature map such as `relu` that happens only when every
product q_t · k_s is zero). Use a feature map whose products are positive
(`elu1`, `taylor2`, `hedgehog`) so the denominator stays away from zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lca.kernels import linear_chunked
from lca.kernels.validation import check_block, check_dtypes

IMPLS = ("chunked", "recurrent", "quadratic")

# The log decay at a document's first token: exp(-1e4 + x) == 0 for x <= 0 in
# float32 (below exp(-104)) and float64 (below exp(-746)), and sums of up to
# 1e30 of them stay finite, so a boundary zeroes every decay that spans it and
# produces no inf or NaN in any product, sum or gradient.
RESET_LOG_DECAY = -1e4


def _shape(x):
    return tuple(np.shape(x))


def _dtype(x):
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_float(name, x, rank, what):
    if len(_shape(x)) != rank:
        raise ValueError(f"{name} must be {what} (rank {rank}); got shape {_shape(x)}")
    if not jnp.issubdtype(_dtype(x), jnp.floating):
        raise ValueError(f"{name} must be a floating dtype; got {_dtype(x)}")


def check_log_decay(log_decay, shapes):
    """log_decay: None or one of `shapes`, floating, every entry <= 0 when concrete."""
    if log_decay is None:
        return
    names = " or ".join(f"{label} = {shape}" for label, shape in shapes)
    if _shape(log_decay) not in [shape for _, shape in shapes]:
        raise ValueError(f"log_decay must have shape {names}; got {_shape(log_decay)}")
    if not jnp.issubdtype(_dtype(log_decay), jnp.floating):
        raise ValueError(f"log_decay must be a floating dtype; got {_dtype(log_decay)}")
    if isinstance(log_decay, jax.core.Tracer):
        return  # values unknown while tracing; the caller keeps g <= 0 (e.g. -softplus)
    values = np.asarray(log_decay, np.float64)
    if not np.all(values <= 0):
        bad = values[~(values <= 0)].ravel()[0]
        raise ValueError(
            f"log_decay must be <= 0 everywhere (a decay exp(g) in (0, 1]); got an entry {bad}")


def check_segment_ids(segment_ids, batch, length):
    """segment_ids: None or an integer [batch, seq] array."""
    if segment_ids is None:
        return
    if _shape(segment_ids) != (batch, length):
        raise ValueError(f"segment_ids must be [batch, seq] = {(batch, length)} (one document"
                         f" id per token); got shape {_shape(segment_ids)}")
    if not jnp.issubdtype(_dtype(segment_ids), jnp.integer):
        raise ValueError(f"segment_ids must be an integer dtype; got {_dtype(segment_ids)}")


def document_starts(segment_ids, first=None):
    """[B, T] ids -> [B, T] bool: the id differs from the previous token's.

    first: [B] bool for token 0 (whether it starts a document after tokens
    elsewhere, e.g. on the previous shard); default False.
    """
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    head = jnp.zeros_like(starts[:, :1]) if first is None else first[:, None]
    return jnp.concatenate([head, starts], axis=1)


def with_resets(g, starts, heads, acc):
    """Per-token log decays [B, T, H] (None: no decay) with RESET_LOG_DECAY where `starts`."""
    if starts is None:
        return g
    base = jnp.zeros(starts.shape + (heads,), acc) if g is None else g
    return jnp.where(starts[..., None], jnp.asarray(RESET_LOG_DECAY, acc), base)


def state_shape(batch, heads, key_dim, value_dim, normalize):
    """The shape of a state: [B, H, K, V], or [B, H, K, V + 1] with normalize."""
    return (batch, heads, key_dim, value_dim + int(bool(normalize)))


def check_linear_args(q, k, v, *, log_decay=None, normalize=False, chunk_size=64,
                      initial_state=None, impl="chunked", segment_ids=None):
    """Validates the `linear_attention` signature before tracing; returns (B, T, H, K, V)."""
    _check_float("q", q, 4, "[batch, seq, heads, key_dim]")
    _check_float("k", k, 4, "[batch, seq, kv_heads, key_dim]")
    _check_float("v", v, 4, "[batch, seq, kv_heads, value_dim]")
    check_dtypes(q=q, k=k, v=v)
    check_heads(_shape(q), _shape(k), _shape(v), "", "batch, seq")
    b, t, h, dk = _shape(q)
    dv = _shape(v)[3]
    check_log_decay(log_decay, [("[heads]", (h,)), ("[batch, seq, heads]", (b, t, h))])
    check_segment_ids(segment_ids, b, t)
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be a bool; got {normalize!r}")
    check_block("chunk_size", chunk_size)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}; got {impl!r}")
    if initial_state is not None:
        want = state_shape(b, h, dk, dv, normalize)
        layout = "[batch, heads, key_dim, value_dim" + (" + 1]" if normalize else "]")
        if _shape(initial_state) != want:
            raise ValueError(f"initial_state must have shape {layout} = {want}"
                             f"{' (normalize=True adds the key-sum column)' if normalize else ''};"
                             f" got {_shape(initial_state)}")
        if not jnp.issubdtype(_dtype(initial_state), jnp.floating):
            raise ValueError(f"initial_state must be a floating dtype; got {_dtype(initial_state)}")
    return b, t, h, dk, dv


def check_heads(q, k, v, suffix, lead):
    """Shapes q [..., H, K], k [..., J, K], v [..., J, V]: q's leading dims, H % J == 0.

    lead: how the leading dims read in a message ("batch, seq" or "batch")."""
    n = len(q) - 2
    if k[:n] != q[:n] or k[-1] != q[-1]:
        raise ValueError(f"k{suffix} must be [{lead}, kv_heads, key_dim] with q{suffix}'s"
                         f" {lead} {q[:n]} and key_dim {q[-1]}; got {k}")
    if v[:-1] != k[:-1]:
        raise ValueError(f"v{suffix} must be [{lead}, kv_heads, value_dim] with k{suffix}'s"
                         f" leading dims {k[:-1]}; got {v}")
    heads, kv_heads = q[-2], k[-2]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"q{suffix} heads ({heads}) must be a multiple of kv_heads ({kv_heads}) for"
            " grouped-query attention; kv_heads that would work:"
            f" {[x for x in range(1, heads + 1) if heads % x == 0]}")


def compute_dtype(dtype):
    """float32 for float32 / bfloat16 inputs, float64 for float64 inputs."""
    return jnp.result_type(jnp.float32, dtype)


def with_key_sum_column(v):
    """[..., V] -> [..., V + 1]: the ones column whose state column is z."""
    return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def finish(num, normalize, dtype):
    """Divides by the key-sum column when normalizing; casts to the output dtype."""
    if normalize:
        den = num[..., -1:]
        num = num[..., :-1] / jnp.where(den == 0, 1, den)
    return num.astype(dtype)


def per_token_log_decay(log_decay, batch, length, heads, acc):
    """None, [H] or [B, T, H] -> None or [B, T, H] in the compute dtype."""
    if log_decay is None:
        return None
    return jnp.broadcast_to(jnp.asarray(log_decay, acc), (batch, length, heads))


def _update(state, k_t, v_t, g_t):
    """One token: S = exp(g) S + k vᵀ on [B, H, K, V]; k_t, v_t [B, J, ...] per kv head."""
    b, h = state.shape[:2]
    j = k_t.shape[1]
    outer = jnp.einsum("bjk,bjv->bjkv", k_t, v_t, preferred_element_type=state.dtype)
    if g_t is not None:
        state = jnp.exp(g_t)[..., None, None] * state
    grouped = state.reshape((b, j, h // j) + state.shape[2:]) + outer[:, :, None]
    return grouped.reshape(state.shape)


def _recurrent(q, k, v, g, state, chunk_size):
    del chunk_size

    def step(s, x):
        q_t, k_t, v_t, g_t = x
        s = _update(s, k_t, v_t, g_t)
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s, preferred_element_type=s.dtype)

    xs = tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (q, k, v, g))
    state = linear_chunked.vary_like(state, q, k, v, g)
    state, out = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state


def _quadratic(q, k, v, g, state, chunk_size):
    del chunk_size
    return linear_chunked.quadratic(q, k, v, g, state)


_KERNELS = {"chunked": linear_chunked.chunked, "recurrent": _recurrent, "quadratic": _quadratic}


def linear_attention(q, k, v, *, log_decay=None, normalize=False, chunk_size=64,
                     initial_state=None, return_state=False, impl="chunked", segment_ids=None):
    """Causal linear attention with an optional decay per head or per token.

    Args:
      q: [B, T, H, K] and k: [B, T, J, K], already through a feature map;
        v: [B, T, J, V], H % J == 0 (grouped-query heads: each group of H / J
        query heads reads one k/v head, never repeated). float32 or bfloat16
        (float64 works: states then are float64 too).
      log_decay: g <= 0, per head [H] (constant decay, as Lightning Attention /
        retention) or per token [B, T, H] (gated, as Mamba-2 / GLA); None: no
        decay. Positive entries raise a ValueError when the array is concrete;
        under tracing build it so that it is <= 0 (e.g. -softplus(x)).
      normalize: divide by q_t · z_t, z the decayed key sum (see the module
        docstring for how z rides in the state).
      chunk_size: tokens per chunk of the "chunked" impl; T need not be a
        multiple of it.
      initial_state: [B, H, K, V] ([B, H, K, V + 1] with normalize), the state
        before the first token; default zeros.
      return_state: also return the state after the last token.
      segment_ids: int [B, T] document ids of packed sequences: the state
        restarts where the id changes (module docstring); None: one document.
      impl: "chunked" (training: intra-chunk masked products plus an
        inter-chunk state; memory linear in T), "recurrent" (token by token; a
        reference; its gradient stores one state per token) or "quadratic"
        (dense masked [T, T] form; a reference).

    Returns:
      [B, T, H, V] in q's dtype, and with return_state the final state
      (float32, or float64 for float64 inputs). Gradients flow to q, k, v,
      log_decay and initial_state.
    """
    b, t, h, dk, dv = check_linear_args(q, k, v, log_decay=log_decay, normalize=normalize,
                                        chunk_size=chunk_size, initial_state=initial_state,
                                        impl=impl, segment_ids=segment_ids)
    acc = compute_dtype(q.dtype)
    g = per_token_log_decay(log_decay, b, t, h, acc)
    if segment_ids is not None:
        g = with_resets(g, document_starts(jnp.asarray(segment_ids)), h, acc)
    if normalize:
        v = with_key_sum_column(v)
    if initial_state is None:
        state = jnp.zeros(state_shape(b, h, dk, dv, normalize), acc)
    else:
        state = jnp.asarray(initial_state).astype(acc)
    num, state = _KERNELS[impl](q, k, v, g, state, int(chunk_size))
    out = finish(num, normalize, q.dtype)
    return (out, state) if return_state else out


def linear_attention_step(state, q_t, k_t, v_t, *, log_decay=None, normalize=False):
    """One decoding step: (o_t, new_state) from the state before token t.

    Args:
      state: [B, H, K, V] ([B, H, K, V + 1] with normalize), as returned by
        `linear_attention(..., return_state=True)` or a previous step.
      q_t: [B, H, K]; k_t: [B, J, K]; v_t: [B, J, V], H % J == 0.
      log_decay: g_t <= 0, [H] or [B, H]; None: no decay.
      normalize: as in `linear_attention`; must match how the state was made.

    Returns:
      o_t [B, H, V] in q_t's dtype and the new state (float32, or float64 for
      float64 inputs).
    """
    _check_float("q_t", q_t, 3, "[batch, heads, key_dim]")
    _check_float("k_t", k_t, 3, "[batch, kv_heads, key_dim]")
    _check_float("v_t", v_t, 3, "[batch, kv_heads, value_dim]")
    check_heads(_shape(q_t), _shape(k_t), _shape(v_t), "_t", "batch")
    if not isinstance(normalize, (bool, np.bool_)):
        raise ValueError(f"normalize must be a bool; got {normalize!r}")
    b, h, dk = _shape(q_t)
    want = state_shape(b, h, dk, _shape(v_t)[2], normalize)
    _check_float("state", state, 4, "[batch, heads, key_dim, value_dim]")
    if _shape(state) != want:
        raise ValueError(f"state must have shape {want}"
                         f"{' (normalize=True adds the key-sum column)' if normalize else ''};"
                         f" got {_shape(state)}")
    check_log_decay(log_decay, [("[heads]", (h,)), ("[batch, heads]", (b, h))])
    acc = compute_dtype(q_t.dtype)
    g_t = None if log_decay is None else jnp.broadcast_to(jnp.asarray(log_decay, acc), (b, h))
    if normalize:
        v_t = with_key_sum_column(v_t)
    new_state = _update(jnp.asarray(state).astype(acc), k_t, v_t, g_t)
    num = jnp.einsum("bhk,bhkv->bhv", q_t, new_state, preferred_element_type=acc)
    return finish(num, normalize, q_t.dtype), new_state
