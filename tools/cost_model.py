"""Communication cost model of lca's sequence-parallel attention kernels (NumPy arithmetic).

  python tools/cost_model.py --kernel ring --layout zigzag --seq_len 1048576 --heads 32 \
      --kv_heads 8 --head_dim 128 --devices 256 --hardware tpu_v5p   # see tools/cost_report.py

Legend: B batch per device, T length, n devices, L = T / n, H / K query / kv
heads, D head_dim, bq / bk tile lengths (docs/cost_model.md has the whole model).

What it counts, mirroring the kernels (`lca/kernels/{blockwise,ring,allgather,
ulysses,linear_parallel}.py`) in NumPy; from lca only the registry's names,
default tiles, layouts, the ring's window rule and the all-to-all's head
rule. A kernel is a modelled strategy, a tiled local kernel (one device) or
`linear`:

  tiles   `tools/cost_tiles.py`: for ring step s, rank r holds the K/V shard
          of rank (r - s) mod n; pairs and tiles classified as the kernels do.
          All-to-all (Ulysses, n = a devices): one step over the whole
          gathered sequence, H / a heads per device. USP (a x r devices):
          the ring over r on the problem the all-to-all leaves (H / a heads,
          max(K / a, 1) kv heads, the ring shard's T / r tokens).
  FLOPs   a MASKED or FULL tile costs 4 B H bq bk D forward (QK^T, PV) and
          10 B H bq bk D backward (QK^T recomputed, dV, dP, dK, dQ); SKIP 0;
          STAIRCASE (blockwise's causal diagonal, s sub-tiles per side) the
          s (s + 1) / 2 sub-tiles on and below its diagonal, (s + 1) / (2 s).
  bytes   what each device sends. Ring forward: steps - 1 hops of one K/V
          buffer (2 B L K D, input dtype) + int32 positions [B, L] (+ segment
          ids). Backward: the same hops again (not at n = 2: one hop, reused
          by XLA from the forward), plus dK/dV in float32 with its block
          (steps - 1 hops) and one hop home. All-gather: (n - 1) shards
          of K/V + positions; backward: a reduce-scatter of float32 dK/dV,
          (n - 1) shards (the backward's re-gather is the forward's under one
          jit: XLA reuses it). Linear: the [m, B, H, K V' + 1] float32 state
          buffer, (n - 1) times (ring, all-gather) or log2 n (doubling), each way.
          All-to-all over a devices: (a - 1) / a of q, K, V, o forward, dO,
          dQ, dK, dV backward (K/V at max(K, a) heads: the copies), positions
          all-gathered once (`all_to_all_bytes`). USP adds its ring's bytes.
  time    compute = FLOPs / (peak x efficiency). A forward ring step takes
          max(slowest rank's compute, latency + hop bytes / link bandwidth):
          the ppermute is issued before the compute. In the backward ring the
          dK/dV hop leaves after the step's compute and is needed by the next
          step, so it adds to the step. All-gather communicates, then computes.
          All-to-alls are not overlapped (`Hardware.all_to_all_seconds`);
          USP's ring hops take the slowest link of all a x r devices.
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
from lca.kernels import registry, ring, ulysses
from cost_tiles import sub_tiles, tile_counts

# ----------------------------------------------------------------------------- problem

def communication(name):
    """How a registry entry communicates: "local", "linear", or its strategy's pattern."""
    return getattr(registry.get(name), "communication", registry.get(name).kind)


MODELLED = ("local", "linear", "ring", "allgather", "alltoall", "alltoall+ring")
ALL_TO_ALL = ("alltoall", "alltoall+ring")
KERNELS = tuple(n for n in registry.names() if communication(n) in MODELLED
                and getattr(registry.get(n), "tiles", True))  # tiled local kernels
LAYOUTS = layouts.LAYOUTS
LINEAR_ALGORITHMS = registry.entries("linear")[0].algorithms


@dataclasses.dataclass(frozen=True)
class Problem:
    """One attention call: `seq_len` tokens over `devices` chips (global batch split out).

    USP ("alltoall+ring"): `a2a` of the devices are the all-to-all axis, devices / a2a
    the ring.
    """

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
    a2a: int = 1                  # USP: devices on the all-to-all axis

    @property
    def comm(self):
        return communication(self.kernel)

    @property
    def one_device(self):
        """A local kernel: the whole sequence on one device."""
        return self.comm == "local"

    @property
    def shard_len(self):
        """Tokens a device holds (before any all-to-all)."""
        return self.seq_len if self.one_device else self.seq_len // self.devices

    @property
    def a2a_degree(self):
        """Devices of the all-to-all axis: all of them (Ulysses), `a2a` (USP), or 1."""
        return {"alltoall": self.devices, "alltoall+ring": self.a2a}.get(self.comm, 1)

    @property
    def layout_shards(self):
        """The shards the layout splits the sequence into (the ring's, for USP)."""
        return self.devices // self.a2a if self.comm == "alltoall+ring" else self.devices

    def local_heads(self):
        """(heads, kv heads) the local kernel sees: the strategy's `local_heads` rule."""
        rule = getattr(registry.get(self.kernel), "local_heads", None)
        if rule is None or self.one_device:
            return self.heads, self.kv_heads
        return rule((1, 1, self.heads, 1), (1, 1, self.kv_heads, 1), (("a2a", self.a2a_degree),))

    def after_all_to_all(self):
        """What one device computes once the all-to-all has run: USP's ring over
        devices / a2a, or (Ulysses) a local kernel over the whole sequence, on H / a heads
        and max(K / a, 1) kv heads, with the tiles the strategy resolved."""
        (bq, bk), (heads, kv_heads) = self.blocks(), self.local_heads()
        kernel = "ring" if self.comm == "alltoall+ring" else registry.DEFAULT_LOCAL
        return dataclasses.replace(self, kernel=kernel, devices=self.devices // self.a2a_degree,
                                   heads=heads, kv_heads=kv_heads, a2a=1, block_q=bq, block_k=bk)

    def blocks(self):
        """(bq, bk) as the kernels resolve them (`local.default_tiles` of the default local
        kernel, or the local kernel itself), at most the lengths."""
        local = registry.local_kernel(self.kernel if self.one_device else None)
        heads, kv_heads = self.local_heads()
        groups = heads // kv_heads
        shard = self.seq_len if self.one_device else self.seq_len // self.layout_shards
        default = (local_lib.default_tiles(local, groups) if self.one_device else
                   local_lib.default_tiles(local, groups, self.layout, shard))
        bq, bk = self.block_q or default, self.block_k or default
        q_len = self.seq_len if self.comm == "alltoall" else shard
        kv_len = self.seq_len if self.comm in ("allgather", "alltoall") else q_len
        return min(bq, q_len), min(bk, kv_len)

    def ring_steps(self):
        """Ring steps taken: n, or fewer for a causal window on the contiguous layout."""
        if self.comm == "alltoall+ring":
            return self.after_all_to_all().ring_steps()
        if self.comm != "ring":
            return self.devices
        options = ring.layout_options(self.layout, self.causal, self.window or None,
                                      self.shard_len, self.devices)
        return options.get("max_steps", self.devices)

    def check(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {list(KERNELS)} (no cost model yet for"
                             " other communication patterns); got {self.kernel!r}")
        layouts.check_layout(self.seq_len, self.layout, self.layout_shards, self.stripe)
        if self.seq_len % self.devices or self.devices % self.a2a:
            raise ValueError(f"seq_len {self.seq_len} and a2a {self.a2a} must divide by, and"
                             f" divide, the {self.devices} devices")
        if self.comm in ALL_TO_ALL:
            ulysses.check_heads(self.heads, self.kv_heads, self.a2a_degree)
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.comm == "linear" and self.linear_algorithm == "doubling" and \
                self.devices & (self.devices - 1):
            raise ValueError("linear_algorithm='doubling' needs a power-of-two device count")
        return self


# ----------------------------------------------------------------------------- FLOPs, bytes


def tile_flops(p: Problem, staircase=False):
    """(forward, backward) FLOPs of one MASKED or FULL tile (padded tile lengths), or of a
    STAIRCASE tile: its s (s + 1) / 2 sub-tiles of (bq / s) x (bk / s)."""
    bq, bk = p.blocks()
    if staircase:
        s = sub_tiles(p)
        bq, bk = bq // s * s * (s + 1) // 2, bk // s  # the same product
    unit = p.batch * (p.heads // p.a2a_degree) * bq * bk * p.head_dim  # a device's heads
    return 4 * unit, 10 * unit


def step_flops(p: Problem):
    """(forward, backward) FLOPs [steps, n] of every (ring step, rank); zeros for linear."""
    if p.comm == "linear":
        return np.zeros((1, p.devices)), np.zeros((1, p.devices))
    if p.comm == "alltoall+ring":  # the ring's, the same on every all-to-all device
        return tuple(np.repeat(f, p.a2a_degree, 1) for f in step_flops(p.after_all_to_all()))
    masked, full, staircase = tile_counts(p)
    (fwd, bwd), (s_fwd, s_bwd) = tile_flops(p), tile_flops(p, staircase=True)
    return ((masked + full) * fwd + staircase * s_fwd,
            (masked + full) * bwd + staircase * s_bwd)


def all_to_all_bytes(p: Problem):
    """(forward, backward) {name: (bytes one device sends, collectives)} of the all-to-all
    over its a devices: (a - 1) / a of each buffer a device holds."""
    a, b, length, d = p.a2a_degree, p.batch, p.shard_len, p.head_dim
    send = lambda heads: b * length * heads * d * p.itemsize * (a - 1) // a
    q, kv = send(p.heads), send(max(p.kv_heads, a))  # K < a heads: copied to a first
    ids = (a - 1) * b * length * 4 * (2 if p.segments else 1)  # all-gathered once
    return ({"q": (q, 1), "K/V": (kv, 2), "ids": (ids, 1), "o": (q, 1)},
            {"dO": (q, 1), "dQ": (q, 1), "dK/dV": (kv, 2)})


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
    if p.comm in ALL_TO_ALL:
        fwd, bwd = all_to_all_bytes(p)
        if p.comm == "alltoall+ring":
            ring_f, ring_b = wire_bytes(p.after_all_to_all())
            fwd.update({f"ring {k}": v for k, v in ring_f.items()})
            bwd.update({f"ring {k}": v for k, v in ring_b.items()})
        return fwd, bwd
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
    a2a_seconds: tuple = (0.0, 0.0)  # (forward, backward) all-to-alls, outside the steps

    @property
    def seconds(self):
        return float(sum(t.sum() for t in self.step_seconds) + sum(self.a2a_seconds))


def _balance(total):
    """Critical path (the slowest rank's FLOPs, summed over steps) / the ideal (total / n)."""
    return float(total.max(1).sum() / (total.sum() / total.shape[1])) if total.sum() else 1.0


def _message_seconds(size, count, bw, latency):
    return count * (latency + size / bw) if count else 0.0


def predict(p: Problem, hardware="tpu_v5p", efficiency=0.5, backward=True, link=None):
    """Per-step times, bytes, overlap, balance and memory of one attention call.

    link: (bandwidth, latency) of a ring hop; default the slowest of a ring over
    p.devices (`Hardware.ring_link`).
    """
    p.check()
    hw = HARDWARE[hardware]
    if p.comm in ALL_TO_ALL:
        return _predict_all_to_all(p, hardware, efficiency, backward)
    rate = hw.peak_flops * efficiency
    bw, lat = link or hw.ring_link(p.devices)
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
    balance = _balance(ff + fb)
    if not backward:
        t_bwd, comm_b, fb, wb = np.zeros_like(t_bwd), 0.0, np.zeros_like(fb), {}
    return Prediction(p, hardware, efficiency, (ff, fb), (total_bytes(wf), total_bytes(wb)),
                      (t_fwd, t_bwd), (slowest_f.sum(), slowest_b.sum()), (comm_f, comm_b),
                      hidden, balance, memory_bytes(p, backward))


def _predict_all_to_all(p: Problem, hardware, efficiency, backward):
    """All-to-alls before and after the compute: the local kernel's (Ulysses) or the ring's
    over devices / a2a (USP, its hops at the slowest link of all p.devices)."""
    hw, a = HARDWARE[hardware], p.a2a_degree
    ff, fb = step_flops(p)
    rate = hw.peak_flops * efficiency
    steps, comm = (ff.max(1) / rate, fb.max(1) / rate * backward), (0.0, 0.0)
    if p.comm == "alltoall+ring":
        ring_p = predict(p.after_all_to_all(), hardware, efficiency, backward,
                         link=hw.ring_link(p.devices))
        steps, comm = ring_p.step_seconds, ring_p.comm_seconds
    bw, lat = hw.ring_link(a)
    seconds = lambda parts: sum(  # the positions' all-gather is a ring of a - 1 messages
        _message_seconds(size / (a - 1), (a - 1) * count, bw, lat) if name == "ids"
        else count * hw.all_to_all_seconds(size, a) for name, (size, count) in parts.items())
    a2a_f, a2a_b = (seconds(parts) for parts in all_to_all_bytes(p))
    a2a = (a2a_f, a2a_b * backward)
    wf, wb = wire_bytes(p)
    return Prediction(p, hardware, efficiency, (ff, fb * backward),
                      (total_bytes(wf), total_bytes(wb) * backward), steps,
                      (ff.max(1).sum() / rate, fb.max(1).sum() / rate * backward),
                      (comm[0] + a2a[0], comm[1] + a2a[1]), (False, False), _balance(ff + fb),
                      memory_bytes(p, backward), a2a)


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
    if p.comm in ALL_TO_ALL:  # the gathered buffers, and what the ring or local kernel holds
        inner = memory_bytes(p.after_all_to_all(), backward)
        saved, temps = inner["saved"], inner["arguments"] + inner["outputs"] + inner["temporaries"]
    return {"arguments": arguments, "outputs": outputs, "saved": saved, "temporaries": temps}


if __name__ == "__main__":  # the command line prints a breakdown (tools/cost_report.py)
    import cost_report

    cost_report.main()
