"""The chips and links `tools/cost_model.py` predicts for, each figure with its source.

Latencies are assumptions wherever a profile says so; everything else is
from the vendor's published figures named beside it.
"""

import dataclasses

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

    def all_to_all_seconds(self, sent, devices):
        """One all-to-all over `devices` chips, each sending `sent` bytes (sent / (n - 1) to
        each other chip): latency + the busiest link's bytes / its bandwidth.

        GPUs: inside a node every GPU sends its (n - 1) / n at link_bw (the switch
        has full bisection); across nodes the (n - node) / n bound for other nodes
        leaves through the GPU's NIC at network_bw. TPUs: the chips form one ring
        (a torus axis with wraparound) and each message takes the shorter way, so
        the busiest link carries sent / (n - 1) x (1 + 2 + ... + (ceil(n / 2) - 1), plus
        n / 4 for even n: the half-way messages split) -> about sent x n / 8.
        A model, not a measurement: no contention with other axes, no pipelining.
        """
        if devices < 2:
            return 0.0
        share = sent / (devices - 1)
        if self.node_size:
            if devices <= self.node_size:
                return self.link_latency + sent / self.link_bw
            return self.network_latency + share * (devices - self.node_size) / self.network_bw
        half = -(-devices // 2)
        load = share * ((half - 1) * half / 2 + (devices / 4 if devices % 2 == 0 else 0))
        return self.link_latency + load / self.link_bw


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
