"""Token layouts: which global tokens each shard of a sequence axis holds.

A layout is a permutation of the sequence axis, applied once (at a model's
input) so that splitting the permuted axis into `num_shards` equal contiguous
pieces gives every shard its tokens:

  contiguous  shard r holds tokens [r L, (r + 1) L), L = T / n.
  striped     round-robin stripes of `stripe` tokens: stripe j (tokens
              [j s, (j + 1) s)) goes to shard j mod n. With stripe 1, shard r
              holds r, r + n, r + 2n, ...
  zigzag      2n chunks of C = T / 2n tokens; shard r holds chunks r and
              2n - 1 - r, in that order.

Causal attention over a contiguous layout gives the last shard n times the
work of the first; striped and zigzag give every shard the same work.

`permute` takes natural order to layout order, `unpermute` is its inverse, and
`positions` gives each layout-order slot's global token position (what masks
and rotary embeddings need). All are reshapes, transposes and reversals (no
gather), and work on NumPy and JAX arrays alike.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("contiguous", "striped", "zigzag")


def multiple(layout: str, num_shards: int, stripe: int = 1) -> int:
    """The number a sequence length must be a multiple of for `layout`."""
    check_layout_name(layout)
    if layout == "zigzag":
        return 2 * num_shards
    if layout == "striped":
        return num_shards * stripe
    return num_shards


def check_layout_name(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}; got {layout!r}")


def check_layout(seq_len: int, layout: str, num_shards: int, stripe: int = 1) -> None:
    """Raises a ValueError naming the nearest valid lengths when `seq_len` does not fit."""
    check_layout_name(layout)
    for name, value in (("num_shards", num_shards), ("stripe", stripe)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if stripe != 1 and layout != "striped":
        raise ValueError(f"stripe={stripe} applies only to layout='striped'; got layout={layout!r}")
    m = multiple(layout, num_shards, stripe)
    if seq_len < 1 or seq_len % m:
        lower, upper = (seq_len // m) * m, (seq_len // m + 1) * m
        nearest = [x for x in (lower, upper) if x > 0]
        need = {"zigzag": f"2 * num_shards = {m} chunks",
                "striped": f"num_shards * stripe = {num_shards} * {stripe} = {m}",
                "contiguous": f"num_shards = {m}"}[layout]
        raise ValueError(
            f"sequence length {seq_len} does not fit layout={layout!r} over {num_shards} shards:"
            f" it must be a multiple of {need}; nearest valid lengths: {nearest}")


def _xp(x):
    if isinstance(x, np.ndarray):
        return np
    import jax.numpy as jnp
    return jnp


def _split(x, axis, shape):
    """Reshapes dimension `axis` of x into `shape`."""
    return x.reshape(x.shape[:axis] + tuple(shape) + x.shape[axis + 1:])


def _merge(x, axis, count):
    """Merges `count` dimensions starting at `axis` into one."""
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + count:])


def _move(x, xp, axis, src, dst):
    return xp.moveaxis(x, axis + src, axis + dst)


def permute(x, layout: str, num_shards: int, axis: int = 1, stripe: int = 1):
    """Natural token order -> layout order along `axis` (default 1: [B, T, ...])."""
    axis = axis % x.ndim
    seq_len = x.shape[axis]
    check_layout(seq_len, layout, num_shards, stripe)
    xp, n = _xp(x), num_shards
    if layout == "contiguous":
        return x
    if layout == "striped":
        # [T] = [T / (n s), n, s] -> [n, T / (n s), s]: shard r gathers stripes r, r + n, ...
        y = _split(x, axis, (seq_len // (n * stripe), n, stripe))
        return _merge(_move(y, xp, axis, 1, 0), axis, 3)
    # zigzag: [T] = [2, n, C]; shard r takes first-half chunk r, then second-half chunk n-1-r.
    y = _split(x, axis, (2, n, seq_len // (2 * n)))
    first = xp.take(y, 0, axis=axis)
    second = xp.flip(xp.take(y, 1, axis=axis), axis=axis)
    return _merge(xp.stack([first, second], axis=axis + 1), axis, 3)


def unpermute(x, layout: str, num_shards: int, axis: int = 1, stripe: int = 1):
    """Layout order -> natural token order along `axis`; the inverse of `permute`."""
    axis = axis % x.ndim
    seq_len = x.shape[axis]
    check_layout(seq_len, layout, num_shards, stripe)
    xp, n = _xp(x), num_shards
    if layout == "contiguous":
        return x
    if layout == "striped":
        y = _split(x, axis, (n, seq_len // (n * stripe), stripe))
        return _merge(_move(y, xp, axis, 0, 1), axis, 3)
    y = _split(x, axis, (n, 2, seq_len // (2 * n)))
    first = xp.take(y, 0, axis=axis + 1)
    second = xp.flip(xp.take(y, 1, axis=axis + 1), axis=axis)
    return _merge(xp.stack([first, second], axis=axis), axis, 3)


def positions(seq_len: int, layout: str, num_shards: int, stripe: int = 1) -> np.ndarray:
    """int32 [seq_len]: the global position of each token, in layout order."""
    return permute(np.arange(seq_len, dtype=np.int32), layout, num_shards, axis=0, stripe=stripe)


def shard_positions(seq_len: int, layout: str, num_shards: int, stripe: int = 1) -> np.ndarray:
    """int32 [num_shards, seq_len / num_shards]: the global positions each shard holds."""
    return positions(seq_len, layout, num_shards, stripe).reshape(num_shards, -1)
