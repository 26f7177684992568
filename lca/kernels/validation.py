"""Argument checks shared by every attention kernel.

They run on shapes and dtypes only, before anything is traced, and raise a
`ValueError` that names the argument, what it got and what was expected.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _shape(x):
    return tuple(np.shape(x))


def _dtype(x):
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


# Input dtypes every kernel takes (float64 for the reference oracle and tests).
DTYPES = ("float32", "bfloat16", "float64")


def check_dtypes(**arrays):
    """Each array is float32, bfloat16 or float64, all the same; a ValueError names them."""
    for name, x in arrays.items():
        if not jnp.issubdtype(_dtype(x), jnp.floating) or _dtype(x).name not in DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16 (float64 for the reference);"
                             f" got {_dtype(x)}")
    kinds = {name: _dtype(x).name for name, x in arrays.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"{', '.join(kinds)} must share one dtype; got"
                         f" {', '.join(f'{n} {d}' for n, d in kinds.items())}: cast them first")


def check_attention_args(q, k, v, *, causal=False, window=None, segment_ids=None,
                         kv_segment_ids=None, positions=None, kv_positions=None,
                         scale=None):
    """Validates the common attention signature; returns (batch, q_len, kv_len)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(_shape(x)) != 4:
            raise ValueError(
                f"{name} must be [batch, len, heads, head_dim] (rank 4); got shape {_shape(x)}")
        if not jnp.issubdtype(_dtype(x), jnp.floating):
            raise ValueError(f"{name} must be a floating dtype; got {_dtype(x)}")
    check_dtypes(q=q, k=k, v=v)
    (b, t, h, d), (bk, s, hk, dk) = _shape(q), _shape(k)
    if _shape(v) != _shape(k):
        raise ValueError(f"v must have k's shape {_shape(k)}; got {_shape(v)}")
    if bk != b:
        raise ValueError(f"k batch {bk} must equal q batch {b}")
    if dk != d:
        raise ValueError(f"k head_dim {dk} must equal q head_dim {d}")
    if hk < 1 or h % hk:
        raise ValueError(
            f"q heads ({h}) must be a multiple of kv_heads ({hk}) for grouped-query attention;"
            f" kv_heads that would work: {[x for x in range(1, h + 1) if h % x == 0]}")
    if window is not None:
        if not causal:
            raise ValueError(f"window={window} needs causal=True (a causal sliding window)")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window must be an integer >= 1 or None; got {window!r}")
    if scale is not None and not np.isscalar(scale):
        raise ValueError(f"scale must be a Python or NumPy scalar; got {type(scale).__name__}")
    _check_ids("segment_ids", segment_ids, (b, t))
    _check_ids("kv_segment_ids", kv_segment_ids, (b, s))
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids needs segment_ids for the queries")
    _check_positions("positions", positions, b, t)
    _check_positions("kv_positions", kv_positions, b, s)
    return b, t, s


def _check_ids(name, x, shape):
    if x is None:
        return
    if not jnp.issubdtype(_dtype(x), jnp.integer):
        raise ValueError(f"{name} must be integers; got dtype {_dtype(x)}")
    if _shape(x) != shape:
        raise ValueError(f"{name} must have shape [batch, len] = {shape}; got {_shape(x)}")


def _check_positions(name, x, batch, length):
    if x is None:
        return
    if not jnp.issubdtype(_dtype(x), jnp.integer):
        raise ValueError(f"{name} must be integers; got dtype {_dtype(x)}")
    if _shape(x) not in ((length,), (batch, length)):
        raise ValueError(
            f"{name} must have shape [len] = ({length},) or [batch, len] = ({batch}, {length});"
            f" got {_shape(x)}")


def check_block(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
