"""The chunked form of causal linear attention with decay (Lightning Attention-2 style).

Dimension legend:
  B batch, T length, H query heads, J key/value heads (H % J == 0, grouped
  query heads), G = H // J, K key_dim, V value_dim (V + 1 when the key-sum
  column of `normalize` rides along), C chunk length, N chunks per scan step,
  L = N * C tokens per scan step.

Recurrence per head, g_t = log_decay_t <= 0:

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,    o_t = S_tᵀ q_t.

Inside a chunk the output is a masked product (q kᵀ ⊙ decay) v plus the
incoming state read through the decayed query; across chunks only the
[K, V] state travels, one per query head (each has its own decay), while
k and v keep their J heads: the G query heads of a group read them in one
einsum, never a repeated copy. One scan step takes N chunks at once: their intra-chunk
products, their chunk-local states, and the states entering each chunk (an
[N, N] decay-weighted mix of the chunk-local states) are all matrix products,
and only the [B, H, K, V] state is carried from step to step.

Every decay exponent is a direct sum of log decays over a segment (a masked
cumulative sum), never a difference of two long prefix sums, so it is <= 0 by
construction: g = -50 per token over millions of tokens underflows to exact
zeros, never to inf or NaN, in the forward pass and in the gradients. One
table per chunk, exp(segsum([0, g])), holds every decay the chunk needs.

The scan body is `jax.checkpoint`ed: the backward pass keeps one [B, H, K, V]
state per step and recomputes the step. Each step slices its tokens from the
inputs by index, so XLA never copies an input into the loop; forward+backward
temporaries stay below one [B, T, H, D] buffer. Gradients (q, k, v, decays,
initial state) are plain autodiff through the scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Chunks per scan step: enough work per step that loop overhead vanishes,
# few enough that the [N, N] chunk mix stays a small share of the FLOPs.
CHUNKS_PER_STEP = 16


def _cdiv(a, b):
    return -(-a // b)


def vary_like(state, *refs):
    """state, typed to vary over every mesh axis the refs vary over inside `jax.shard_map`.

    A scan carry must keep its type; a zero initial state varies over no axis
    while the step's output varies like the inputs. Adding typed scalar zeros
    fixes that with public API only; outside shard_map it is a no-op.
    """
    def cast(x):
        for ref in refs:
            if ref is not None:
                x = x + jnp.zeros_like(ref, shape=(), dtype=x.dtype)
        return x

    return jax.tree.map(cast, state)


def segsum(g):
    """[..., C] log decays -> [..., C, C] with D[t, s] = sum_{s < r <= t} g_r.

    Zero on and above the diagonal (t <= s); a masked cumulative sum, so each
    entry is a sum of the g's it covers and is <= 0 whenever they are.
    """
    c = g.shape[-1]
    strict = jnp.tril(jnp.ones((c, c), bool), -1)  # r = t > s
    return jnp.cumsum(jnp.where(strict, g[..., :, None], 0), axis=-2)


def tail_sums(g, axis):
    """sum_{r > s} g_r along `axis` (an exclusive reverse cumulative sum)."""
    inclusive = lax.cumsum(g, axis=axis % g.ndim, reverse=True)
    widths = [(0, 0)] * g.ndim
    widths[axis % g.ndim] = (0, 1)
    return lax.slice_in_dim(jnp.pad(inclusive, widths), 1, None, axis=axis)


def decay_table(g):
    """[..., C] log decays -> [..., C + 1, C + 1] decays, zero above the diagonal.

    exp(segsum) of [0, g_0, ..., g_{C-1}]: entry (t + 1, s + 1) is the decay
    exp(sum_{s < r <= t} g_r) from token s to token t, column 0 the decay from
    before the first token to t, and row C the decay from s to after the last.
    """
    padded = jnp.pad(g, [(0, 0)] * (g.ndim - 1) + [(1, 0)])
    size = padded.shape[-1]
    return jnp.where(jnp.tril(jnp.ones((size, size), bool)), jnp.exp(segsum(padded)), 0)


def block(q, k, v, g, state):
    """N chunks of C tokens and the state entering the first one.

    Args:
      q: [B, N, C, H, K]; k: [B, N, C, J, K]; v: [B, N, C, J, V].
      g: [B, N, C, H] log decays (compute dtype) or None for no decay.
      state: [B, H, K, V] state before the first token (compute dtype).

    Returns:
      out [B, N, C, H, V] and the state after the last token, both in the
      state's dtype.
    """
    acc = state.dtype
    b, n, c, h, dk = q.shape
    j = k.shape[3]
    q = q.reshape(b, n, c, j, h // j, dk)
    state = state.reshape(b, j, h // j, dk, -1)
    scores = jnp.einsum("bntjgk,bnsjk->bnjgts", q, k, preferred_element_type=acc)
    if g is None:
        weights = jnp.where(jnp.tril(jnp.ones((c, c), bool)), scores, 0)
        q_in = q
        chunk_states = jnp.einsum("bnsjk,bnsjv->bnjkv", k, v, preferred_element_type=acc)
        after = jnp.cumsum(chunk_states, axis=1)[:, :, :, None] + state[:, None]
    else:
        g = g.reshape(b, n, c, j, h // j)
        table = decay_table(jnp.moveaxis(g, 2, -1))  # [B, N, J, G, C + 1, C + 1]
        weights = scores * table[..., 1:, 1:]
        q_in = q * jnp.moveaxis(table[..., 1:, 0], -1, 2)[..., None]  # from the chunk's start
        to_end = jnp.moveaxis(table[..., -1, 1:], -1, 2)  # [B, N, C, J, G]: to the chunk's end
        k_out = k[:, :, :, :, None] * to_end[..., None]
        chunk_states = jnp.einsum("bnsjgk,bnsjv->bnjgkv", k_out, v, preferred_element_type=acc)
        chunks = decay_table(jnp.moveaxis(g.sum(axis=2), 1, -1))  # [B, J, G, N + 1, N + 1]
        carried = jnp.moveaxis(chunks[..., 1:, 0], -1, 1)[..., None, None] * state[:, None]
        after = jnp.einsum("bjgmi,bijgkv->bmjgkv", chunks[..., 1:, 1:], chunk_states,
                           preferred_element_type=acc) + carried
    incoming = jnp.concatenate([state[:, None], after[:, :-1]], axis=1)  # [B, N, J, G, K, V]
    out = (jnp.einsum("bnjgts,bnsjv->bntjgv", weights, v, preferred_element_type=acc)
           + jnp.einsum("bntjgk,bnjgkv->bntjgv", q_in, incoming, preferred_element_type=acc))
    return out.reshape(b, n, c, h, -1), after[:, -1].reshape(b, h, dk, -1)


def geometry(length, chunk_size, chunks_per_step=CHUNKS_PER_STEP):
    """(C, N, steps): chunks of C tokens, N per scan step; T is padded to steps * N * C."""
    c = min(chunk_size, length)
    n = _cdiv(length, c)
    steps = _cdiv(n, chunks_per_step)
    return c, _cdiv(n, steps), steps


def scan_steps(fn, carry, xs, length, step_len, steps):
    """carry, ys = fn(carry, xs of one step) over the steps of [B, T, ...] arrays.

    xs is a tuple of [B, T, ...] arrays (or None), zero-padded to steps *
    step_len; each step reads its [B, step_len, ...] slices. A padded token
    has k = v = 0 and g = 0, so it changes no state. The step is
    `jax.checkpoint`ed: the backward pass keeps one carry per step. Steps
    slice the arrays by index rather than scanning over them, so XLA never
    copies an input into the loop. ys (None or [B, step_len, ...] per step)
    come back as [B, T, ...].
    """
    padded = steps * step_len

    def pad(x):
        if x is None or padded == length:
            return x
        return jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))

    xs = tuple(pad(x) for x in xs)
    if steps == 1:
        carry, ys = fn(carry, xs)
        ys = None if ys is None else ys[None]
    else:
        def step(carry, i):
            return fn(carry, tuple(None if x is None else lax.dynamic_slice_in_dim(
                x, i * step_len, step_len, axis=1) for x in xs))

        carry = vary_like(carry, *xs)
        carry, ys = lax.scan(jax.checkpoint(step, prevent_cse=False), carry, jnp.arange(steps))
    if ys is None:
        return carry, None
    ys = jnp.moveaxis(ys, 0, 1)  # a free reshape when B == 1
    return carry, ys.reshape(ys.shape[0], padded, *ys.shape[3:])[:, :length]


def chunked(q, k, v, g, state, chunk_size, chunks_per_step=CHUNKS_PER_STEP):
    """Chunked causal linear attention.

    Args:
      q: [B, T, H, K]; k: [B, T, J, K]; v: [B, T, J, V]; g: [B, T, H] or None;
      state: [B, H, K, V] initial state in the compute dtype.
      chunk_size: C (clipped to T); T need not be a multiple of it.

    Returns:
      out [B, T, H, V] and the final state [B, H, K, V], in the state's dtype.
    """
    b, t = q.shape[:2]
    c, n, steps = geometry(t, chunk_size, chunks_per_step)

    def step(state, x):
        chunks = (None if a is None else a.reshape(b, n, c, *a.shape[2:]) for a in x)
        out, state = block(*chunks, state)
        return state, out.reshape(b, n * c, *out.shape[3:])

    return scan_steps(step, state, (q, k, v, g), t, n * c, steps)[::-1]


def quadratic(q, k, v, g, state):
    """The dense masked form: one chunk as long as the sequence (a reference)."""
    expand = lambda x: None if x is None else x[:, None]
    out, state = block(expand(q), expand(k), expand(v), expand(g), state)
    return out[:, 0], state


def segment_state(k, v, g, acc, chunk_size, heads, keep_carries=False):
    """(total log decay [B, H], state [B, H, K, V]) of a segment from a zero state.

    k [B, T, J, K], v [B, T, J, V], g [B, T, H] or None; `heads` = H. A
    [K, L] x [L, V] product per head and scan step of L tokens, nothing
    [B, T, ...] kept: what a shard publishes before its own output exists.
    keep_carries: also return the pair entering each scan step of
    `geometry(T, chunk_size)`, stacked: ([steps, B, H], [steps, B, H, K, V]).
    """
    b, t, j = k.shape[:3]
    group = heads // j
    c, n, steps = geometry(t, chunk_size)
    as_heads = lambda pair, lead: tuple(x.reshape(lead + (heads,) + x.shape[len(lead) + 2:])
                                        for x in pair)

    def step(carry, x):
        total, state = carry
        k, v, g = x
        if g is None:
            add = jnp.einsum("bsjk,bsjv->bjkv", k, v, preferred_element_type=acc)[:, :, None]
        else:
            g = g.reshape(g.shape[:2] + (j, group))
            k = k[:, :, :, None] * jnp.exp(tail_sums(g, axis=1))[..., None]  # [B, L, J, G, K]
            step_total = g.sum(axis=1)
            total = total + step_total
            state = jnp.exp(step_total)[..., None, None] * state
            add = jnp.einsum("bsjgk,bsjv->bjgkv", k, v, preferred_element_type=acc)
        return (total, state + add), (carry if keep_carries else None)

    zero = (jnp.zeros((b, j, group), acc), jnp.zeros((b, j, group, k.shape[3], v.shape[3]), acc))
    if not keep_carries:
        return as_heads(scan_steps(step, zero, (k, v, g), t, n * c, steps)[0], (b,))
    padded = steps * n * c
    xs = tuple(None if x is None else jnp.pad(x, [(0, 0), (0, padded - t)]
                                                + [(0, 0)] * (x.ndim - 2)) for x in (k, v, g))
    sliced = lambda i: tuple(None if x is None else lax.dynamic_slice_in_dim(
        x, i * n * c, n * c, axis=1) for x in xs)
    final, entering = lax.scan(lambda carry, i: step(carry, sliced(i)),
                               vary_like(zero, *xs), jnp.arange(steps))
    return as_heads(final, (b,)), as_heads(entering, (steps, b))
