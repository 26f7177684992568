"""The local-kernel protocol: what a strategy runs on the tokens one device holds.

Dimension legend: B batch, T query length, S key/value length (the tokens
this device holds, or has gathered), H query heads, K kv heads (H % K == 0),
D head_dim.

A local softmax kernel is a `LocalKernel`: two pure functions of those
tokens and a static `LocalConfig` (mask kind, logit scale, tiles):

  forward(cfg, q, k, v, arrays) -> (out, lse)
      out [B, T, H, D] and lse [B, T, H], float32 (float64 for float64
      inputs where the kernel supports them). A query that sees no key gets
      out 0 and lse -inf.
  backward(cfg, q, k, v, arrays, lse, do, delta) -> (dq, dk, dv), float32
      lse and delta [B, T, H] are the row's *global* log-sum-exp (over every
      key it sees, on every shard) and rowsum(do * out) - dlse, so the result
      is this K/V's exact part of the gradient: a ring's parts sum to it.

`arrays` (`masks.MaskArrays`) holds the positions and segment ids of exactly
these tokens. A strategy never imports a kernel: it is handed one, and
`resolve` checks, before anything is traced, that the kernel supports the
mask, dtype and shapes asked of it. On one device `attend` wraps any kernel
in one `jax.custom_vjp` that saves only the inputs, the output and the
float32 log-sum-exp.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lca import layouts
from lca.kernels.masks import MaskSpec
from lca.kernels.validation import check_block

F32 = jnp.float32
MASK_KINDS = ("causal", "window", "segments")
VIEWS = ("shards", "gathered", "whole")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which global tokens a local kernel may be handed, known before tracing.

    A kernel whose masks must be static (splash) reads the candidate
    (query positions, key positions) pairs from it; every other kernel
    ignores it. The positions are those of `lca.layouts` for a sequence of
    `seq_len` tokens in `layout` over `num_shards` shards:

      shards    the queries of one shard and the keys of one shard (a ring step)
      gathered  the queries of one shard and the keys of all shards, in layout
                order (after an all-gather)
      whole     every token, in layout order; on one device (contiguous, n = 1)
                keys may be `kv_len` long, at positions arange(kv_len)
    """

    layout: str
    seq_len: int
    num_shards: int = 1
    stripe: int = 1
    view: str = "whole"
    kv_len: int | None = None

    def candidates(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(query position arrays, key position arrays): any query array may meet any key
        array, each int32 numpy, distinct."""
        full = layouts.positions(self.seq_len, self.layout, self.num_shards, self.stripe)
        shards = list(full.reshape(self.num_shards, -1))
        keys = full if self.kv_len is None else np.arange(self.kv_len, dtype=np.int32)
        q = {"shards": shards, "gathered": shards, "whole": [full]}[self.view]
        kv = {"shards": shards, "gathered": [full], "whole": [keys]}[self.view]
        return q, kv


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    """Static options of one local-kernel call (hashable: a `nondiff_argnums` key).

    placement: where the tokens come from (`Placement`), set by a strategy that
    knows its layout and by `lca.attention` for the natural order; None when
    positions are only known at run time.
    """

    spec: MaskSpec
    scale: float
    block_q: int
    block_k: int
    placement: Placement | None = None


@dataclasses.dataclass(frozen=True)
class Supports:
    """What a local kernel accepts; `LocalKernel.unsupported` checks a call against it."""

    masks: tuple[str, ...] = MASK_KINDS        # of MASK_KINDS; bidirectional always works
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float64")
    grouped_heads: bool = True                 # kv_heads < heads without repeating K/V
    length_multiple: int = 1                   # query and key lengths are multiples of this
    head_dims: tuple[int, ...] = ()            # () = any head_dim


@dataclasses.dataclass(frozen=True)
class LocalKernel:
    """A local softmax kernel: the registry's entry for it.

    forward / backward: the protocol above; None for a kernel that only runs
    whole on one device (then `direct` is what `lca.attention` calls).
    tiles: default tile length (block_q = block_k): on one device and under a
    strategy without grouped-query heads, and under a strategy with them;
    None for a kernel that takes no tiles.
    direct: a single-device function with `lca.attention`'s signature, used
    instead of the generic wrapper (the float64 oracle, XLA's own attention).
    baseline: the one-device baseline of the benchmark suite.
    bench: measured by the benchmark suite.
    platform: the platform it is written for ("tpu", "gpu"; None: any). Elsewhere
    it runs in Pallas interpret mode (`lca.kernels.platform`), and `local="auto"`
    picks the kernel written for the platform at hand.
    typed_vma: traces under `jax.shard_map(check_vma=True)`; False for a Pallas
    kernel, whose outputs carry no varying-axes type (strategies then run under
    check_vma=False).
    """

    name: str
    forward: Callable | None
    backward: Callable | None
    doc: str
    supports: Supports = Supports()
    tiles: tuple[int, int] | None = (512, 256)
    direct: Callable | None = None
    baseline: bool = False
    bench: bool = True
    platform: str | None = None
    typed_vma: bool = True

    kind = "local"

    @property
    def shards(self) -> bool:
        """Runs under a strategy: it gives the log-sum-exp and exact gradient parts."""
        return self.forward is not None and self.backward is not None

    def unsupported(self, q, k, spec: MaskSpec, *, strategy: str | None = None) -> str | None:
        """What of this call the kernel does not support (a phrase), or None."""
        s, dtype = self.supports, np.dtype(q.dtype).name
        if strategy is not None and not self.shards:
            return (f"strategy {strategy!r} (it gives no log-sum-exp and gradient parts to"
                    " merge; it runs only whole, on one device)")
        wanted = [m for m, on in zip(MASK_KINDS, (spec.causal, spec.window is not None,
                                                  spec.segments)) if on]
        missing = [m for m in wanted if m not in s.masks]
        if missing:
            return f"{' and '.join(missing)} masks"
        if dtype not in s.dtypes:
            return f"dtype {dtype} (it takes {', '.join(s.dtypes)})"
        if not s.grouped_heads and q.shape[2] != k.shape[2]:
            return f"grouped-query heads ({q.shape[2]} query heads, {k.shape[2]} kv heads)"
        m = s.length_multiple
        if m > 1 and (q.shape[1] % m or k.shape[1] % m):
            up = lambda n: -(-n // m) * m
            return (f"lengths {q.shape[1]} / {k.shape[1]} (they must be multiples of {m}; the"
                    f" nearest that work: {up(q.shape[1])} / {up(k.shape[1])})")
        if s.head_dims and q.shape[3] not in s.head_dims:
            return f"head_dim {q.shape[3]} (it takes {list(s.head_dims)})"
        return None


def resolve(local, q, k, spec: MaskSpec, *, strategy: str | None = None) -> LocalKernel:
    """The LocalKernel named by `local` (a name, a kernel or None: the default), checked
    against this call; a ValueError names the kernel, the problem and kernels that work."""
    from lca.kernels import registry  # the registry imports this module

    return registry.local_kernel(local, q=q, k=k, spec=spec, strategy=strategy)


def default_tiles(kernel: LocalKernel, groups: int, layout: str | None = None,
                  shard_len: int | None = None, sharded: bool | None = None) -> int:
    """The tile length a kernel runs with when none is given, resolved once per call.

    The kernel's own default; under a strategy (`sharded`, by default whenever a
    layout is given) the second one with grouped-query heads (G = H / K query
    heads share a K/V tile, so G x bq rows of float32 logits per step); on a
    zigzag shard at most one chunk (shard_len / 2), so no tile straddles the
    two chunks.
    """
    if kernel.tiles is None:
        return 0
    sharded = layout is not None if sharded is None else sharded
    block = kernel.tiles[1] if sharded and groups > 1 else kernel.tiles[0]
    if layout == "zigzag" and shard_len is not None:
        block = min(block, max(1, shard_len // 2))
    return block


def config(kernel: LocalKernel, q, k, *, causal, window, segments, scale, block_q=None,
           block_k=None, q_len=None, kv_len=None, sharded=False,
           placement: Placement | None = None) -> LocalConfig:
    """A LocalConfig for this call: defaults resolved, tiles no longer than the lengths
    (q_len, kv_len: the lengths the kernel will see, default q's and k's; more after a
    gather; sharded: a strategy's call, see `default_tiles`)."""
    default = default_tiles(kernel, q.shape[2] // k.shape[2], sharded=sharded)
    bq = default if block_q is None else block_q
    bk = default if block_k is None else block_k
    if kernel.tiles is not None:
        check_block("block_q", bq)
        check_block("block_k", bk)
    return LocalConfig(
        spec=MaskSpec(bool(causal), None if window is None else int(window), bool(segments)),
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        block_q=min(int(bq), q_len or q.shape[1]) if bq else 0,
        block_k=min(int(bk), kv_len or k.shape[1]) if bk else 0, placement=placement)


def merge(out, lse, out_t, lse_t):
    """Log-sum-exp merge of two normalised partial results (float32); -inf rows stay 0."""
    lse_new = jnp.logaddexp(lse, lse_t)
    safe = jnp.where(jnp.isfinite(lse_new), lse_new, 0.0)
    w, w_t = jnp.exp(lse - safe), jnp.exp(lse_t - safe)
    return w[..., None] * out + w_t[..., None] * out_t, lse_new


def row_delta(do, out, dlse):
    """rowsum(do * out) - dlse, float32 [B, T, H] (float64 for float64): the per-row term."""
    dtype = jnp.promote_types(jnp.promote_types(do.dtype, out.dtype), F32)
    return (do.astype(dtype) * out.astype(dtype)).sum(-1) - dlse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def attend(kernel: LocalKernel, cfg: LocalConfig, q, k, v, arrays):
    """One device: (out in q's dtype, float32 lse) of `kernel`, differentiable."""
    out, lse = kernel.forward(cfg, q, k, v, arrays)
    return out.astype(q.dtype), lse


def _attend_fwd(kernel, cfg, q, k, v, arrays):
    out, lse = attend(kernel, cfg, q, k, v, arrays)
    return (out, lse), (q, k, v, arrays, out, lse)


def _attend_bwd(kernel, cfg, residuals, cotangents):
    q, k, v, arrays, out, lse = residuals
    do, dlse = cotangents
    dq, dk, dv = kernel.backward(cfg, q, k, v, arrays, lse, do, row_delta(do, out, dlse))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


attend.defvjp(_attend_fwd, _attend_bwd)
