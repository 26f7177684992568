"""One shard's causal linear attention around its state exchange, with the backward written out.

Dimension legend:
  M = B·m: the m segments of each of B rows, folded into the batch (linear_parallel),
  T segment length, H query heads (J key/value heads), K key_dim, V value_dim
  (V + 1 with normalize), C chunk, L tokens per scan step of
  `linear_chunked.geometry(T, chunk_size)`, steps scan steps.

Forward, as `linear_attention_shard` runs it:

  1. pairs = (Γ, S) of each segment from a zero state (`segment_state`), keeping
     the pair that enters each scan step (one [M, H, K, V] per step);
  2. incoming = exchange(pairs): the collective, which reads only the pairs;
  3. num = the chunked output from a zero state, which does not wait for it;
  4. x = num + exp(G_t) q_tᵀ S_in: the incoming state read through each query's
     decay since its segment began (G_t).

Autodiff of those four runs three reverse scans and holds each one's
gradients of q, k, v and g as whole [M, T, ...] buffers until they are added.
The backward here writes each gradient once:

  1. d_in = Σ_t exp(G_t) q_t d_x_tᵀ, a reduction over the shard ([M, H, K, V]);
  2. d_pairs = the exchange's transpose of d_in (JAX's vjp of the collective:
     the same bytes as autodiff), plus the pairs' own cotangent;
  3. one reverse scan over the steps: step i recomputes its chunked block from
     the pair entering it and pulls (d carry, d x_i) back through block, read
     and pair update at once. The block's state output is the same function as
     `segment_state`'s update (equal to rounding), so the carry's cotangent
     carries both the later steps' outputs and the segment summary's.

Recomputation is what `jax.checkpoint` of the scan did before: one forward of
each step in the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lca.kernels import linear as linear_lib
from lca.kernels import linear_chunked


def _read_step(before, q, g, incoming):
    """exp(G_t) q_tᵀ S_in for one step's tokens; before [M, H]: the decay from the
    segment's start to the step's first token. Returns (read [M, L, H, V], before')."""
    read = jnp.einsum("bthk,bhkv->bthv", q, incoming, preferred_element_type=incoming.dtype)
    if g is None:
        return read, before
    read = read * jnp.exp(before[:, None] + jnp.cumsum(g, axis=1))[..., None]
    return read, before + g.sum(axis=1)


def _step(carry, xs, incoming, chunks):
    """One scan step from the pair (Γ, S) entering it: ((Γ', S'), x of its L tokens)."""
    total, state = carry
    q, k, v, g = xs
    m, length = q.shape[:2]
    split = lambda x: None if x is None else x.reshape((m, chunks, length // chunks)
                                                       + x.shape[2:])
    num, after = linear_chunked.block(split(q), split(k), split(v), split(g), state)
    read, total = _read_step(total, q, g, incoming)
    return (total, after), num.reshape(read.shape) + read


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def local_and_exchange(q, k, v, g, exchange, chunk_size):
    """This shard's output before normalization, with its exchanged states.

    Args:
      q: [M, T, H, K]; k: [M, T, J, K]; v: [M, T, J, V]; g: [M, T, H] log
        decays in the compute dtype, or None.
      exchange: (Γ [M, H], S [M, H, K, V]) of this shard's segments -> the state
        entering each, [M, H, K, V] (a collective; differentiable by JAX).
      chunk_size: C.

    Returns:
      (x [M, T, H, V] compute dtype, incoming [M, H, K, V], pairs): x = the
      chunked output from a zero state plus the incoming state's read.
    """
    return _forward(q, k, v, g, exchange, chunk_size)[0]


def _forward(q, k, v, g, exchange, chunk_size):
    acc = linear_lib.compute_dtype(q.dtype)
    pairs, entering = linear_chunked.segment_state(k, v, g, acc, chunk_size, q.shape[2],
                                                   keep_carries=True)
    incoming = exchange(pairs)  # issued before the local output, which does not read it
    t = q.shape[1]
    c, n, steps = linear_chunked.geometry(t, chunk_size)
    num, _ = linear_chunked.chunked(q, k, v, g, jnp.zeros_like(pairs[1]), chunk_size)

    def read(before, xs):
        num, q, g = xs
        part, before = _read_step(before, q, g, incoming)
        return before, num + part

    x = linear_chunked.scan_steps(read, jnp.zeros_like(pairs[0]), (num, q, g), t, n * c,
                                  steps)[1]
    return (x, incoming, pairs), (q, k, v, g, incoming, pairs, entering)


def _backward(exchange, chunk_size, residuals, cotangents):
    q, k, v, g, incoming, pairs, entering = residuals
    d_x, d_incoming, d_pairs = cotangents
    t = q.shape[1]
    c, n, steps = linear_chunked.geometry(t, chunk_size)
    step_len = n * c

    # 1. d_in: the read's pull on the incoming state, one reduction over the shard.
    def reduce(carry, xs):
        before, total = carry
        q, g, d_x = xs
        weight = q.astype(d_x.dtype)
        if g is not None:
            weight = weight * jnp.exp(before[:, None] + jnp.cumsum(g, axis=1))[..., None]
            before = before + g.sum(axis=1)
        return (before, total + jnp.einsum("bthk,bthv->bhkv", weight, d_x)), None

    start = (jnp.zeros_like(pairs[0]), jnp.zeros_like(incoming))
    _, d_in = linear_chunked.scan_steps(reduce, start, (q, g, d_x), t, step_len, steps)[0]
    # 2. Through the collective's transpose.
    _, pull = jax.vjp(exchange, pairs)
    d_carry = jax.tree.map(jnp.add, d_pairs, pull(d_incoming + d_in)[0])

    # 3. One reverse scan: every step's block, read and pair update pulled back at once.
    padded = steps * step_len
    pad = lambda x: x if x is None or padded == t else jnp.pad(
        x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
    xs = tuple(pad(x) for x in (q, k, v, g, d_x))
    sliced = lambda x, i: None if x is None else lax.dynamic_slice_in_dim(
        x, i * step_len, step_len, axis=1)

    def back(d_carry, i):
        q, k, v, g, d_x = (sliced(x, i) for x in xs)
        carry = (entering[0][i], entering[1][i])
        _, pull = jax.vjp(lambda c, x: _step(c, x, incoming, n), carry, (q, k, v, g))
        d_carry, d_inputs = pull((d_carry, d_x))
        return d_carry, d_inputs

    d_carry = linear_chunked.vary_like(d_carry, *xs)
    _, grads = lax.scan(back, d_carry, jnp.arange(steps), reverse=True)

    def unstack(d):  # [steps, M, L, ...] -> [M, T, ...]
        if d is None:
            return None
        d = jnp.moveaxis(d, 0, 1)
        return d.reshape((d.shape[0], padded) + d.shape[3:])[:, :t]

    return tuple(unstack(d) for d in grads)


local_and_exchange.defvjp(_forward, _backward)
