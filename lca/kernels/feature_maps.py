"""Feature maps φ for linear attention: q, k -> φ(q), φ(k) before `linear_attention`.

Dimension legend: ... leading dims (typically B, T), H heads, D head_dim,
F features out.

All are pure functions of the input and, for Hedgehog, of parameters the
model layer owns and passes in. They keep the input dtype; the arithmetic
that needs it (softmax) runs in float32.

  elu1      elu(x) + 1 > 0 (Katharopoulos et al., 2020); F = D.
  relu      max(x, 0) >= 0; F = D.
  taylor2   second-order Taylor expansion of exp(q · k · scale):
            φ(q) · φ(k) = 1 + s + s² / 2 with s = scale q · k, which is > 0
            for every s (Based, Zoology); F = 1 + D + D².
  hedgehog  softmax([x W + b, -(x W + b)]) over the 2E features, W and b
            learnable per head (Zhang et al., 2024, "The Hedgehog & the
            Porcupine"); F = 2E, positive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def elu1(x):
    """elu(x) + 1: positive features, same shape as x."""
    return jax.nn.elu(x) + 1


def relu(x):
    """max(x, 0): non-negative features, same shape as x."""
    return jax.nn.relu(x)


def taylor2(x, scale=None):
    """[..., D] -> [..., 1 + D + D²] with φ(q) · φ(k) = 1 + s + s²/2, s = scale · q · k.

    scale defaults to D ** -0.5 (softmax attention's logit scale).
    """
    d = x.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    x1 = x * jnp.asarray(np.sqrt(scale), x.dtype)
    x2 = (x1[..., :, None] * x1[..., None, :]).reshape(x.shape[:-1] + (d * d,))
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    return jnp.concatenate([ones, x1, x2 * jnp.asarray(np.sqrt(0.5), x.dtype)], axis=-1)


def hedgehog(x, weight, bias=None):
    """Hedgehog's learnable map.

    Args:
      x: [..., H, D].
      weight: [H, D, E] per head (or [D, E] shared by every head).
      bias: [H, E] (or [E]), optional.

    Returns:
      [..., H, 2E] in x's dtype: softmax over [x W + b, -(x W + b)], positive
      and summing to one per head.
    """
    if np.ndim(weight) not in (2, 3) or np.shape(weight)[-2] != x.shape[-1]:
        raise ValueError(f"weight must be [heads, head_dim, features] or [head_dim, features]"
                         f" with head_dim {x.shape[-1]}; got {np.shape(weight)}")
    if np.ndim(weight) == 3 and np.shape(weight)[0] != x.shape[-2]:
        raise ValueError(f"weight has {np.shape(weight)[0]} heads; x has {x.shape[-2]}")
    spec = "...hd,hde->...he" if np.ndim(weight) == 3 else "...hd,de->...he"
    z = jnp.einsum(spec, x, weight, preferred_element_type=jnp.float32)
    if bias is not None:
        if np.shape(bias) != np.shape(weight)[:-2] + np.shape(weight)[-1:]:
            raise ValueError(f"bias must be {np.shape(weight)[:-2] + np.shape(weight)[-1:]}"
                             f" to match weight {np.shape(weight)}; got {np.shape(bias)}")
        z = z + bias
    return jax.nn.softmax(jnp.concatenate([z, -z], axis=-1), axis=-1).astype(x.dtype)


def hedgehog_identity(heads, head_dim, dtype=jnp.float32):
    """Hedgehog parameters (weight [H, D, D], bias [H, D]) that start at the identity map.

    The Hedgehog paper initialises W to the identity; a layer registers these
    as its parameters and trains them.
    """
    weight = jnp.broadcast_to(jnp.eye(head_dim, dtype=dtype), (heads, head_dim, head_dim))
    return weight, jnp.zeros((heads, head_dim), dtype)
