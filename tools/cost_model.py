"""Communication cost model of lca's sequence-parallel attention kernels (pure Python + NumPy).

  python tools/cost_model.py --kernel ring --layout zigzag --seq_len 1048576 --heads 32 \
      --kv_heads 8 --head_dim 128 --devices 256 --hardware tpu_v5p
  python tools/cost_model.py --plots docs/figures      # the two figures and their CSVs

Dimension legend: B batch per device, T sequence length, n devices on the
sequence axis, L = T / n shard length, H query heads, K kv heads, D head_dim,
bq / bk tile lengths, nq / nk tiles per shard.

What it counts, mirroring the kernels (`lca/kernels/{blockwise,ring,allgather,
linear_parallel}.py`), not importing them (no JAX here):

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

import argparse
import dataclasses
import functools
import math
import os

import numpy as np

# ----------------------------------------------------------------------------- hardware

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One chip and the links a 1-D ring of chips uses (bytes/s per direction)."""

    name: str
    peak_flops: float      # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bw: float          # bytes/s (reported, not used by the step model)
    link_bw: float         # one link, one direction, as a ring neighbour uses it
    link_latency: float    # seconds per hop (an assumption everywhere: see each profile)
    node_size: int = 0     # GPUs: devices on the fast link; rings larger than this
    network_bw: float = 0.0       # cross nodes at network_bw / network_latency
    network_latency: float = 0.0

    def ring_link(self, devices):
        """(bandwidth, latency) of the slowest hop of a ring over `devices` chips."""
        if self.node_size and devices > self.node_size:
            return self.network_bw, self.network_latency
        return self.link_bw, self.link_latency


HARDWARE = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s.
    # ICI: 6 links per chip, 400 Gb/s = 50 GB/s each way per link (Jouppi et al., "TPU v4",
    # ISCA 2023, arXiv:2304.01433). Latency 2 us per hop: an assumption, not a published figure.
    "tpu_v4": Hardware("TPU v4", 275e12, 32 * 2**30, 1200 * GB, 50 * GB, 2e-6),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s,
    # ICI 400 GB/s bidirectional per chip over 4 ports -> 50 GB/s each way per link.
    # Latency: assumed, as for v4.
    "tpu_v5e": Hardware("TPU v5e", 197e12, 16 * GB, 819 * GB, 50 * GB, 2e-6),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s,
    # ICI 1200 GB/s bidirectional per chip over 6 ports (3D torus) -> 100 GB/s each way
    # per link. Latency: assumed, as for v4.
    "tpu_v5p": Hardware("TPU v5p", 459e12, 95 * GB, 2765 * GB, 100 * GB, 2e-6),
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s dense bf16, 80 GB HBM2e at 2039 GB/s,
    # NVLink 600 GB/s (300 GB/s each way) within an 8-GPU HGX node. Across nodes one
    # 200 Gb/s HDR InfiniBand NIC per GPU (DGX A100) = 25 GB/s each way. Latencies (5 us
    # NVLink, 10 us InfiniBand per ppermute) are assumptions of NCCL-like small-message costs.
    "a100": Hardware("A100 80GB SXM", 312e12, 80 * GB, 2039 * GB, 300 * GB, 5e-6,
                     node_size=8, network_bw=25 * GB, network_latency=10e-6),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s,
    # NVLink 900 GB/s (450 GB/s each way) within a node; across nodes one 400 Gb/s NDR
    # NIC per GPU (DGX H100, ConnectX-7) = 50 GB/s each way. Latencies assumed as for A100.
    "h100": Hardware("H100 SXM", 989e12, 80 * GB, 3350 * GB, 450 * GB, 5e-6,
                     node_size=8, network_bw=50 * GB, network_latency=10e-6),
}

# ----------------------------------------------------------------------------- problem

KERNELS = ("ring", "allgather", "blockwise", "linear")
LAYOUTS = ("contiguous", "striped", "zigzag")
LINEAR_ALGORITHMS = ("ring", "allgather", "doubling")
DEFAULT_BLOCK = 512  # lca.parallel.sequence._DEFAULT_BLOCK (halved with grouped-query heads)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention call: `seq_len` tokens over `devices` chips (global batch split out)."""

    kernel: str = "ring"
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
    block_q: int | None = None  # None: lca.parallel.sequence.default_block
    block_k: int | None = None
    linear_algorithm: str = "ring"
    value_dim: int | None = None  # linear: V (default head_dim)
    normalize: bool = False       # linear: one extra value column

    @property
    def shard_len(self):
        return self.seq_len if self.kernel == "blockwise" else self.seq_len // self.devices

    def blocks(self):
        """(bq, bk) as the kernels resolve them: default per layout, at most the lengths."""
        n, t = self.devices, self.seq_len
        zigzag = self.layout == "zigzag" and self.kernel != "blockwise"
        grouped = self.heads != self.kv_heads and self.kernel != "blockwise"
        default = DEFAULT_BLOCK // 2 if grouped else DEFAULT_BLOCK
        default = min(default, t // (2 * n)) if zigzag else default
        bq, bk = self.block_q or default, self.block_k or default
        kv_len = t if self.kernel == "allgather" else self.shard_len
        return min(bq, self.shard_len), min(bk, kv_len)

    def ring_steps(self):
        """Ring steps taken: n, or fewer for a causal window on the contiguous layout."""
        n = self.devices
        if self.kernel == "ring" and self.causal and self.window and self.layout == "contiguous":
            return min(n, 1 + -(-(self.window - 1) // self.shard_len))  # sequence.window_steps
        return n

    def check(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)}; got {self.kernel!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}; got {self.layout!r}")
        m = {"zigzag": 2 * self.devices, "striped": self.devices * self.stripe}.get(
            self.layout, self.devices)
        if self.seq_len % m:
            raise ValueError(f"seq_len {self.seq_len} must be a multiple of {m} for"
                             f" layout={self.layout!r} on {self.devices} devices")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.kernel == "linear" and self.linear_algorithm == "doubling" and \
                self.devices & (self.devices - 1):
            raise ValueError("linear_algorithm='doubling' needs a power-of-two device count")
        return self


# ----------------------------------------------------------------------------- layouts, tiles


def shard_positions(seq_len, layout, n, stripe=1):
    """int64 [n, L]: global positions each shard holds (as lca.layouts.shard_positions)."""
    t = np.arange(seq_len)
    if layout == "striped":
        t = t.reshape(seq_len // (n * stripe), n, stripe).transpose(1, 0, 2)
    elif layout == "zigzag":
        halves = t.reshape(2, n, seq_len // (2 * n))
        t = np.stack([halves[0], halves[1][::-1]], axis=1)
    return t.reshape(n, -1)


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
    n = 1 if p.kernel == "blockwise" else p.devices
    pos = shard_positions(p.seq_len, p.layout, n, p.stripe)
    bq, bk = p.blocks()
    qx = block_extremes(pos, bq)
    if p.kernel == "allgather":
        kx = block_extremes(pos.reshape(1, -1), bk)
        masked, full = classify(qx, kx, p.causal, p.window)
        return masked.sum((-1, -2))[None], full.sum((-1, -2))[None]
    kx = block_extremes(pos, bk)
    sx = block_extremes(pos, pos.shape[1])  # one block per shard
    steps = p.ring_steps() if p.kernel == "ring" else 1
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
    if p.kernel == "linear":
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
    if p.kernel == "blockwise" or n == 1:
        return {}, {}
    if p.kernel == "ring":
        hops = p.ring_steps() - 1
        # With one hop (n = 2) there is no loop around it, and under one jit XLA
        # reuses the forward's arrived K/V in the backward (CSE) instead of resending.
        again = hops if hops > 1 else 0
        fwd = {"K/V": (kv, hops), "ids": (ids, hops)}
        bwd = {"K/V": (kv, again), "ids": (ids, again), "dK/dV": (dkv, hops),
               "dK/dV home": (dkv, 1 if hops else 0)}
        return fwd, bwd
    if p.kernel == "allgather":
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
    if p.kernel == "ring":
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
    if p.kernel == "linear":  # only the state exchange is modelled, not the local compute
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
    gather = p.devices if p.kernel == "allgather" else 1
    kv_buf = 2 * kv_one * gather  # K and V stacked (gathered: n shards)
    tile = b * h * bq * bk * 4
    arguments = (2 * q_bytes + 2 * kv_one) * item if backward else (q_bytes + 2 * kv_one) * item
    outputs = (2 * q_bytes + 2 * kv_one) * item if backward else q_bytes * item
    saved = rows * 4  # log-sum-exp (the output itself is an output)
    in_flight = 2 if p.kernel == "ring" else 1
    forward = (in_flight * (kv_buf * item + ids * gather) + 2 * (q_bytes * 4 + rows * 4)
               + 2 * tile)
    temps = forward
    if backward:
        temps = max(forward, in_flight * (kv_buf * item + ids * gather)
                    + in_flight * kv_buf * 4      # dK/dV accumulators in flight
                    + 2 * q_bytes * 4 + 2 * rows * 4  # dq, one step's dq, delta, lse rows
                    + kv_buf * 4                  # one step's dK/dV
                    + 4 * tile)
    if p.kernel == "linear":
        temps = 0
    return {"arguments": arguments, "outputs": outputs, "saved": saved, "temporaries": temps}


# ----------------------------------------------------------------------------- report


def _si(x, unit):
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _seconds(x):
    for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x * 1e9:.3g} ns"


_HIDDEN = {True: "hidden under compute", False: "NOT fully hidden",
           None: "(local compute not modelled for linear attention)"}


def format_prediction(r: Prediction) -> str:
    p, hw = r.problem, HARDWARE[r.hardware]
    bw, lat = hw.ring_link(p.devices)
    bq, bk = p.blocks()
    lines = [f"{p.kernel} / {p.layout}: T={p.seq_len} on {p.devices} x {hw.name}"
             f" (L={p.shard_len}, heads {p.heads}/{p.kv_heads}, head_dim {p.head_dim},"
             f" {8 * p.itemsize}-bit inputs, tiles {bq}x{bk}, causal={p.causal})",
             f"  peak {_si(hw.peak_flops, 'FLOP/s')} x efficiency {r.efficiency};"
             f" ring link {_si(bw, 'B/s')} each way, {_seconds(lat)} per hop"]
    for i, name in enumerate(("forward", "backward")):
        flops = r.flops[i]
        if not flops.any() and not r.bytes_sent[i]:
            continue
        lines.append(f"  {name}: {_si(flops.sum() / flops.shape[1], 'FLOP')} per device on"
                     f" average, slowest rank per step {_si(flops.max(1).max(), 'FLOP')};"
                     f" sends {_si(r.bytes_sent[i], 'B')} per device")
        lines.append(f"    compute {_seconds(r.compute_seconds[i])}, communication"
                     f" {_seconds(r.comm_seconds[i])},"
                     f" step total {_seconds(r.step_seconds[i].sum())};"
                     f" communication {_HIDDEN[r.hidden[i]]}")
    lines.append(f"  critical path / ideal (load balance): {r.balance:.3f}")
    lines.append(f"  predicted time: {_seconds(r.seconds)}")
    mem = r.memory
    lines.append("  memory per device: " + ", ".join(f"{k} {_si(v, 'B')}" for k, v in mem.items())
                 + f"; HBM {_si(hw.hbm_bytes, 'B')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

PLOT_HEADS = dict(heads=32, kv_heads=8, head_dim=128, itemsize=2)
PLOT_LENGTHS = [1 << k for k in range(15, 23)]  # 32k .. 4M tokens


def overlap_threshold(hardware, efficiency=0.5, devices=256, layout="zigzag", pass_="forward",
                      grid=256, limit=1 << 17):
    """Smallest shard length (a multiple of `grid`) from which every ring hop hides.

    Bisection over multiples of `grid`, assuming overlap is monotone in the
    shard length (compute grows as L^2, a hop as L).
    """
    def hidden(length):
        p = Problem("ring", layout, length * devices, devices=devices, **PLOT_HEADS)
        r = predict(p, hardware, efficiency)
        f, b = r.flops
        rate = HARDWARE[hardware].peak_flops * efficiency
        bw, lat = HARDWARE[hardware].ring_link(devices)
        size = wire_bytes(p)[0]["K/V"][0] + wire_bytes(p)[0]["ids"][0]
        comm = lat + size / bw
        work = (f if pass_ == "forward" else b).max(1)[:-1] / rate
        return bool((work >= comm).all())

    lo, hi = 1, limit // grid
    if not hidden(hi * grid):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hidden(mid * grid) else (mid + 1, hi)
    return lo * grid


def _write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for row in rows:
            f.write(",".join(str(x) for x in row) + "\n")


def write_plots(out_dir, efficiency=0.5, devices=256, lengths=PLOT_LENGTHS):
    """Writes cost_step_time.{png,csv} and cost_overlap.{png,csv} into `out_dir`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = []
    series = [("ring", x) for x in LAYOUTS] + [("allgather", "zigzag")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, hw in zip(axes, ("tpu_v5p", "h100")):
        for kernel, layout in series:
            times, too_big = [], []
            for t in lengths:
                r = predict(Problem(kernel, layout, t, devices=devices, **PLOT_HEADS), hw,
                            efficiency)
                times.append(r.seconds)
                if sum(r.memory.values()) > HARDWARE[hw].hbm_bytes:
                    too_big.append((t, r.seconds))
                rows.append((hw, kernel, layout, t, devices, r.seconds, *r.compute_seconds,
                             *r.comm_seconds, *r.bytes_sent, r.balance, *r.hidden,
                             r.memory["temporaries"]))
            line, = ax.loglog(lengths, times, marker="o", ms=3, label=f"{kernel} {layout}")
            if too_big:  # one attention layer alone would not fit in HBM
                ax.plot(*zip(*too_big), "x", ms=10, mew=2, color=line.get_color())
        ideal = [4 * 0.5 * 3.5 * t * t * PLOT_HEADS["heads"] * PLOT_HEADS["head_dim"]
                 / devices / (HARDWARE[hw].peak_flops * efficiency) for t in lengths]
        ax.loglog(lengths, ideal, "k:", label="causal FLOPs / n (ideal)")
        ax.plot([], [], "kx", ms=8, label="exceeds HBM (one layer)")
        ax.set_title(f"{HARDWARE[hw].name} x {devices}")
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("predicted attention fwd+bwd per layer (s)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"predicted step time, heads 32/8, head_dim 128, bf16, efficiency {efficiency}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cost_step_time.png"), dpi=120)
    plt.close(fig)

    _write_csv(os.path.join(out_dir, "cost_step_time.csv"),
               ("hardware", "kernel", "layout", "seq_len", "devices", "seconds", "compute_fwd_s",
                "compute_bwd_s", "comm_fwd_s", "comm_bwd_s", "bytes_fwd", "bytes_bwd", "balance",
                "hidden_fwd", "hidden_bwd", "temp_bytes"), rows)

    names, rows = list(HARDWARE), []
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for i, pass_ in enumerate(("forward", "backward")):
        values = [overlap_threshold(h, efficiency, devices, pass_=pass_) or 0 for h in names]
        rows += [(h, pass_, devices, v) for h, v in zip(names, values)]
        bars = ax.bar(np.arange(len(names)) + (i - 0.5) * width, values, width, label=pass_)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(np.arange(len(names)), [HARDWARE[h].name for h in names], fontsize=8)
    ax.set_ylabel("smallest shard length L (tokens)")
    ax.set_title(f"smallest shard length from which every K/V hop hides under its step\n"
                 f"(ring, zigzag, {devices} chips, heads 32/8, head_dim 128, bf16,"
                 f" efficiency {efficiency})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cost_overlap.png"), dpi=120)
    plt.close(fig)

    _write_csv(os.path.join(out_dir, "cost_overlap.csv"),
               ("hardware", "pass", "devices", "smallest_shard_len"), rows)


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", default="ring", choices=KERNELS)
    parser.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    parser.add_argument("--seq_len", type=int, default=1 << 20)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--devices", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="per device")
    parser.add_argument("--itemsize", type=int, default=2, help="bytes per input element")
    parser.add_argument("--hardware", default="tpu_v5p", choices=list(HARDWARE))
    parser.add_argument("--efficiency", type=float, default=0.5,
                        help="fraction of peak FLOP/s the tiles reach")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--block", type=int, default=None, help="tile length (default per layout)")
    parser.add_argument("--linear_algorithm", default="ring", choices=LINEAR_ALGORITHMS)
    parser.add_argument("--forward_only", action="store_true")
    parser.add_argument("--plots", metavar="DIR", help="write the figures and CSV into DIR")
    args = parser.parse_args(argv)
    if args.plots:
        write_plots(args.plots, args.efficiency)
        print(f"wrote cost_step_time.png/.csv and cost_overlap.png/.csv to {args.plots}")
        return
    p = Problem(args.kernel, args.layout, args.seq_len, args.heads, args.kv_heads, args.head_dim,
                args.devices, args.batch, args.itemsize, window=args.window,
                block_q=args.block, block_k=args.block, linear_algorithm=args.linear_algorithm)
    print(format_prediction(predict(p, args.hardware, args.efficiency, not args.forward_only)))


if __name__ == "__main__":
    main()
