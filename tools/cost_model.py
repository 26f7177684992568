"""Communication cost model of lca's sequence-parallel attention kernels (NumPy arithmetic).

  python tools/cost_model.py --kernel ring --layout zigzag --seq_len 1048576 --heads 32 \
      --kv_heads 8 --head_dim 128 --devices 256 --hardware tpu_v5p   # see tools/cost_report.py

Dimension legend: B batch per device, T sequence length, n devices on the
sequence axis, L = T / n shard length, H query heads, K kv heads, D head_dim,
bq / bk tile lengths, nq / nk tiles per shard.

What it counts, mirroring the kernels (`lca/kernels/{blockwise,ring,allgather,
linear_parallel}.py`) in NumPy; from lca only the registry's names, default
tiles, layouts and the ring's window rule. A kernel is a modelled strategy,
a tiled local kernel (one device) or `linear`:

  tiles   For ring step s, rank r holds the K/V shard of rank (r - s) mod n.
          The (query shard, key shard) pair is classified from its position
          extremes; a fully masked pair runs nothing. Otherwise every
          (bq x bk) tile is SKIP / MASKED / FULL by the same per-block
          min/max rule as `masks.classify_blocks`.
  FLOPs   a MASKED or FULL tile costs 4 B H bq bk D forward (QK^T, PV) and
          10 B H bq bk D backward (QK^T recomputed, dV, dP, dK, dQ); SKIP 0.
  bytes   what each device sends. Ring forward: steps - 1 hops of one K/V
          buffer (2 B L K D, input dtype) + int32 positions [B, L] (+ segment
          ids). Backward: the same hops again (not at n = 2: one hop, reused
          by XLA from the forward), plus dK/dV in float32 with its block
          (steps - 1 hops) and one hop home. All-gather: (n - 1) shards
          of K/V + positions; backward: a reduce-scatter of float32 dK/dV,
          (n - 1) shards (the backward's re-gather is the forward's under one
          jit: XLA reuses it). Linear: the [m, B, H, K V' + 1] float32 state
          buffer, (n - 1) times (ring, all-gather) or log2 n (doubling), each way.
  time    compute = FLOPs / (peak x efficiency). A forward ring step takes
          max(slowest rank's compute, latency + hop bytes / link bandwidth):
          the ppermute is issued before the compute. In the backward ring the
          dK/dV hop leaves after the step's compute and is needed by the next
          step, so it adds to the step. All-gather communicates, then computes.
  memory  per device: inputs, saved output and log-sum-exp, the buffers in
          flight and one step's float32 partial results and tile temporaries.

Not counted: softmax exponentials and other elementwise work, HBM traffic,
per-tile launch overheads, link contention, and the torus mapping of a ring.
"""

import dataclasses
import functools
import math

import numpy as np

from hardware import HARDWARE

from lca import layouts
from lca.kernels import local as local_lib
from lca.kernels import registry, ring

# ----------------------------------------------------------------------------- problem

def communication(name):
    """How a registry entry communicates: "local", "linear", or its strategy's pattern."""
    return getattr(registry.get(name), "communication", registry.get(name).kind)


MODELLED = ("local", "linear", "ring", "allgather")  # the patterns modelled here
KERNELS = tuple(n for n in registry.names() if communication(n) in MODELLED
                and getattr(registry.get(n), "tiles", True))  # tiled local kernels
LAYOUTS = layouts.LAYOUTS
LINEAR_ALGORITHMS = registry.entries("linear")[0].algorithms


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention call: `seq_len` tokens over `devices` chips (global batch split out)."""

    kernel: str = registry.DEFAULT_STRATEGY
    layout: str = "zigzag"
    seq_len: int = 1 << 20
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    devices: int = 256
    batch: int = 1            # per device
    itemsize: int = 2         # bytes of the input dtype (bf16)
    causal: bool = True
    window: int | None = None
    segments: bool = False    # segment ids travel with K/V
    stripe: int = 1
    block_q: int | None = None  # None: the local kernel's default (local.default_tiles)
    block_k: int | None = None
    linear_algorithm: str = "ring"
    value_dim: int | None = None  # linear: V (default head_dim)
    normalize: bool = False       # linear: one extra value column

    @property
    def comm(self):
        return communication(self.kernel)

    @property
    def one_device(self):
        """A local kernel: the whole sequence on one device."""
        return self.comm == "local"

    @property
    def shard_len(self):
        return self.seq_len if self.one_device else self.seq_len // self.devices

    def blocks(self):
        """(bq, bk) as the kernels resolve them (`local.default_tiles` of the default local
        kernel, or the local kernel itself), at most the lengths."""
        local = registry.local_kernel(self.kernel if self.one_device else None)
        groups = self.heads // self.kv_heads
        default = (local_lib.default_tiles(local, groups) if self.one_device else
                   local_lib.default_tiles(local, groups, self.layout, self.shard_len))
        bq, bk = self.block_q or default, self.block_k or default
        kv_len = self.seq_len if self.comm == "allgather" else self.shard_len
        return min(bq, self.shard_len), min(bk, kv_len)

    def ring_steps(self):
        """Ring steps taken: n, or fewer for a causal window on the contiguous layout."""
        if self.comm != "ring":
            return self.devices
        options = ring.layout_options(self.layout, self.causal, self.window or None,
                                      self.shard_len, self.devices)
        return options.get("max_steps", self.devices)

    def check(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)} (no cost model yet for"
                             " other communication patterns); got {self.kernel!r}")
        layouts.check_layout(self.seq_len, self.layout, self.devices, self.stripe)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.comm == "linear" and self.linear_algorithm == "doubling" and \
                self.devices & (self.devices - 1):
            raise ValueError("linear_algorithm='doubling' needs a power-of-two device count")
        return self


# ----------------------------------------------------------------------------- layouts, tiles


def shard_positions(seq_len, layout, n, stripe=1):
    """int64 [n, L]: global positions each shard holds (`lca.layouts.shard_positions`)."""
    return layouts.shard_positions(seq_len, layout, n, stripe).astype(np.int64)


def block_extremes(pos, block):
    """(min, max, padded) per block of the last axis; padding excluded, as masks.block_stats."""
    length = pos.shape[-1]
    nb = -(-length // block)
    pad = nb * block - length
    widths = [(0, 0)] * (pos.ndim - 1) + [(0, pad)]
    lo = np.pad(pos, widths, constant_values=np.iinfo(np.int64).max)
    hi = np.pad(pos, widths, constant_values=np.iinfo(np.int64).min)
    shape = pos.shape[:-1] + (nb, block)
    padded = np.zeros(nb, bool)
    padded[-1] = pad > 0
    return lo.reshape(shape).min(-1), hi.reshape(shape).max(-1), padded


def classify(q, k, causal, window):
    """(masked, full) bool [..., nq, nk] from (min, max, padded) extremes, as classify_blocks."""
    qmin, qmax = q[0][..., :, None], q[1][..., :, None]
    kmin, kmax = k[0][..., None, :], k[1][..., None, :]
    shape = np.broadcast_shapes(qmin.shape, kmin.shape)
    none, every = np.zeros(shape, bool), np.ones(shape, bool)
    if causal:
        none |= qmax < kmin
        every &= qmin >= kmax
        if window is not None:
            none |= qmin - kmax >= window
            every &= qmax - kmin < window
    full = every & ~k[2]
    return ~none & ~full, ~none & full


@functools.lru_cache(maxsize=256)
def tile_counts(p: Problem):
    """(masked, full) int64 [steps, n]: tiles of each kind rank r computes at ring step s.

    Ring: step s pairs rank r's queries with rank (r - s) mod n's keys, and a
    fully masked shard pair computes nothing. All-gather: one step against all
    keys in layout order. Blockwise: one device, one step.
    """
    n = 1 if p.one_device else p.devices
    pos = shard_positions(p.seq_len, p.layout, n, p.stripe)
    bq, bk = p.blocks()
    qx = block_extremes(pos, bq)
    if p.comm == "allgather":
        kx = block_extremes(pos.reshape(1, -1), bk)
        masked, full = classify(qx, kx, p.causal, p.window)
        return masked.sum((-1, -2))[None], full.sum((-1, -2))[None]
    kx = block_extremes(pos, bk)
    sx = block_extremes(pos, pos.shape[1])  # one block per shard
    steps = p.ring_steps() if p.comm == "ring" else 1
    masked, full = np.zeros((steps, n), np.int64), np.zeros((steps, n), np.int64)
    for s in range(steps):
        roll = lambda x: np.roll(x, s, axis=0)  # roll(x)[r] = x[(r - s) mod n]
        m, f = classify(qx, (roll(kx[0]), roll(kx[1]), kx[2]), p.causal, p.window)
        sm, sf = classify(sx, (roll(sx[0]), roll(sx[1]), sx[2]), p.causal, p.window)
        runs = (sm | sf)[:, 0, 0]
        masked[s], full[s] = m.sum((-1, -2)) * runs, f.sum((-1, -2)) * runs
    return masked, full


# ----------------------------------------------------------------------------- FLOPs, bytes


def tile_flops(p: Problem):
    """(forward, backward) FLOPs of one MASKED or FULL tile (padded tile lengths)."""
    bq, bk = p.blocks()
    unit = p.batch * p.heads * bq * bk * p.head_dim
    return 4 * unit, 10 * unit


def step_flops(p: Problem):
    """(forward, backward) FLOPs [steps, n] of every (ring step, rank); zeros for linear."""
    if p.comm == "linear":
        return np.zeros((1, p.devices)), np.zeros((1, p.devices))
    masked, full = tile_counts(p)
    fwd, bwd = tile_flops(p)
    return (masked + full) * fwd, (masked + full) * bwd


def wire_bytes(p: Problem):
    """Bytes each device sends, as {name: (bytes per message, messages)}, forward and backward.

    A collective-permute sends its buffer; a ring all-gather or reduce-scatter
    sends n - 1 shard-sized messages.
    """
    n, b, length = p.devices, p.batch, p.shard_len
    kv = 2 * b * length * p.kv_heads * p.head_dim * p.itemsize
    ids = b * length * 4 * (2 if p.segments else 1)  # int32 positions (+ segment ids)
    dkv = 2 * b * length * p.kv_heads * p.head_dim * 4
    if p.one_device or n == 1:
        return {}, {}
    if p.comm == "ring":
        hops = p.ring_steps() - 1
        # With one hop (n = 2) there is no loop around it, and under one jit XLA
        # reuses the forward's arrived K/V in the backward (CSE) instead of resending.
        again = hops if hops > 1 else 0
        fwd = {"K/V": (kv, hops), "ids": (ids, hops)}
        bwd = {"K/V": (kv, again), "ids": (ids, again), "dK/dV": (dkv, hops),
               "dK/dV home": (dkv, 1 if hops else 0)}
        return fwd, bwd
    if p.comm == "allgather":
        return {"K/V": (kv, n - 1), "ids": (ids, n - 1)}, {"dK/dV": (dkv, n - 1)}
    m = 2 if p.layout == "zigzag" else 1
    value = (p.value_dim or p.head_dim) + (1 if p.normalize else 0)
    state = m * b * p.heads * (p.head_dim * value + 1) * 4
    rounds = int(math.log2(n)) if p.linear_algorithm == "doubling" else n - 1
    return {"state": (state, rounds)}, {"state": (state, rounds)}


def total_bytes(parts):
    return sum(size * count for size, count in parts.values())


# ----------------------------------------------------------------------------- time, memory


@dataclasses.dataclass
class Prediction:
    problem: Problem
    hardware: str
    efficiency: float
    flops: tuple            # (forward [steps, n], backward [steps, n])
    bytes_sent: tuple       # (forward, backward) per device
    step_seconds: tuple     # (forward [steps], backward [steps])
    compute_seconds: tuple  # critical path of compute alone, (forward, backward)
    comm_seconds: tuple     # communication alone, (forward, backward)
    hidden: tuple           # (forward, backward): every hop hides under its step's compute
    balance: float          # critical path / ideal (total / n), compute only
    memory: dict

    @property
    def seconds(self):
        return float(sum(t.sum() for t in self.step_seconds))


def _message_seconds(size, count, bw, latency):
    return count * (latency + size / bw) if count else 0.0


def predict(p: Problem, hardware="tpu_v5p", efficiency=0.5, backward=True):
    """Per-step times, bytes, overlap, balance and memory of one attention call."""
    p.check()
    hw = HARDWARE[hardware]
    rate = hw.peak_flops * efficiency
    bw, lat = hw.ring_link(p.devices)
    ff, fb = step_flops(p)
    wf, wb = wire_bytes(p)
    slowest_f, slowest_b = ff.max(1) / rate, fb.max(1) / rate
    steps = len(slowest_f)
    if p.comm == "ring":
        hop = lambda parts: _message_seconds(
            sum(parts[x][0] for x in ("K/V", "ids") if parts[x][1]), 1, bw, lat)
        comm = lambda t: np.array([t] * (steps - 1) + [0.0]) if steps > 1 else np.zeros(1)
        comm_kv_f, comm_kv_b = comm(hop(wf)), comm(hop(wb))
        dkv_hop = _message_seconds(wb["dK/dV"][0], 1, bw, lat) if steps > 1 else 0.0
        t_fwd = np.maximum(slowest_f, comm_kv_f)
        t_bwd = np.maximum(slowest_b, comm_kv_b) + dkv_hop  # the last step's: the hop home
        comm_f, comm_b = comm_kv_f.sum(), comm_kv_b.sum() + steps * dkv_hop
        # Backward: whether the K/V hops hide; the dK/dV hop never does (see the docstring).
        hidden = (bool((slowest_f >= comm_kv_f).all()), bool((slowest_b >= comm_kv_b).all()))
    else:
        comm_f = sum(_message_seconds(s, c, bw, lat) for s, c in wf.values())
        comm_b = sum(_message_seconds(s, c, bw, lat) for s, c in wb.values())
        t_fwd, t_bwd = slowest_f + comm_f, slowest_b + comm_b
        hidden = (comm_f == 0, comm_b == 0)
    if p.comm == "linear":  # only the state exchange is modelled, not the local compute
        t_fwd, t_bwd = np.array([comm_f]), np.array([comm_b])
        hidden = (None, None)
    total = ff + fb
    critical = total.max(1).sum()
    balance = float(critical / (total.sum() / total.shape[1])) if total.sum() else 1.0
    if not backward:
        t_bwd, comm_b, fb, wb = np.zeros_like(t_bwd), 0.0, np.zeros_like(fb), {}
    return Prediction(p, hardware, efficiency, (ff, fb), (total_bytes(wf), total_bytes(wb)),
                      (t_fwd, t_bwd), (slowest_f.sum(), slowest_b.sum()), (comm_f, comm_b),
                      hidden, balance, memory_bytes(p, backward))


def memory_bytes(p: Problem, backward=True):
    """Estimated bytes per device: {'arguments', 'outputs', 'saved', 'temporaries'}.

    Arguments: q, k, v (and the output cotangent). Outputs: o (and dq, dk, dv).
    Temporaries: the peak of the forward and backward phases, each holding
    its buffers in flight, float32 accumulators, one step's float32 partial
    results and one tile's float32 temporaries (2 forward, 4 backward).
    """
    b, length, h, k, d, item = p.batch, p.shard_len, p.heads, p.kv_heads, p.head_dim, p.itemsize
    bq, bk = p.blocks()
    q_bytes, kv_one = b * length * h * d, b * length * k * d  # elements
    rows = b * length * h  # per-row statistics
    ids = b * length * 4 * (2 if p.segments else 1)
    gather = p.devices if p.comm == "allgather" else 1
    kv_buf = 2 * kv_one * gather  # K and V stacked (gathered: n shards)
    tile = b * h * bq * bk * 4
    arguments = (2 * q_bytes + 2 * kv_one) * item if backward else (q_bytes + 2 * kv_one) * item
    outputs = (2 * q_bytes + 2 * kv_one) * item if backward else q_bytes * item
    saved = rows * 4  # log-sum-exp (the output itself is an output)
    in_flight = 2 if p.comm == "ring" else 1
    forward = (in_flight * (kv_buf * item + ids * gather) + 2 * (q_bytes * 4 + rows * 4)
               + 2 * tile)
    temps = forward
    if backward:
        temps = max(forward, in_flight * (kv_buf * item + ids * gather)
                    + in_flight * kv_buf * 4      # dK/dV accumulators in flight
                    + 2 * q_bytes * 4 + 2 * rows * 4  # dq, one step's dq, delta, lse rows
                    + kv_buf * 4                  # one step's dK/dV
                    + 4 * tile)
    if p.comm == "linear":
        temps = 0
    return {"arguments": arguments, "outputs": outputs, "saved": saved, "temporaries": temps}


if __name__ == "__main__":  # the command line prints a breakdown (tools/cost_report.py)
    import cost_report

    cost_report.main()
