"""The device part: lca's accelerator kernel beside blockwise and the platform's own attention.

    python experiments/bench.py --part device [--quick] [--out DIR]

On a machine with a TPU or GPU: causal forward and forward+backward at T in
{4k, 16k, 64k}, bfloat16, batch 1, heads 16/16 and 32/8, head_dim 128, for

  * the platform's lca kernel (`registry.auto_local()`: splash on TPU,
    pallas_gpu on GPU),
  * `blockwise` (lca's scan of einsums),
  * `jax.nn.dot_product_attention` with implementation="cudnn" on GPU
    ("xla" on TPU), through `lca.attention(impl="xla")`.

Each row: median seconds over `repeats` timed calls, TFLOP/s on useful FLOPs
(the causal half), the fraction of the chip's dense bfloat16 peak
(`PEAK_TFLOPS` by device kind; blank for a kind not listed), and beside it
the kernel's max relative error against the float64 reference at T = 512
(the same bfloat16 inputs; outputs and q/k/v gradients; the reference on the
host CPU), so a fast wrong kernel cannot hide. Writes bench_device.csv and
prints the table. On a machine without an accelerator it says so and
returns no rows (the command exits 0). About 3 minutes on one H100-class GPU.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import lca
from lca.bench import timing
from lca.kernels import registry

# Dense bfloat16 peak per chip, TFLOP/s, from the vendors' data sheets (NVIDIA H100/H200
# SXM: 989, H100 PCIe 756, H100/H200 NVL 835; A100: 312; Google Cloud TPU pages: v4 275,
# v5e 197, v5p 459, v6e 918). The longest name contained in the device kind wins.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "H200 NVL": 835.0, "A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0}
LENGTHS = (4096, 16384, 65536)
QUICK_LENGTHS = (4096,)
HEADS = ((16, 16), (32, 8))
HEAD_DIM = 128
CHECK_LEN = 512
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Row:
    platform: str
    device_kind: str
    kernel: str
    heads: int
    kv_heads: int
    seq_len: int
    mode: str
    seconds: float | None       # None: it did not run (see note)
    tflops: float | None
    peak_fraction: float | None
    check_error: float
    note: str = ""              # why a row did not run (e.g. out of memory)


def accelerator(devices=None):
    """The first TPU or GPU device of `devices` (default jax.devices()), or None."""
    devices = jax.devices() if devices is None else devices
    return next((d for d in devices if d.platform in ("tpu", "gpu", "cuda", "rocm")), None)


def plan(device):
    """(platform, [(label, lca.attention options)]) measured on `device`."""
    platform = "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform
    lca_kernel = next((e.name for e in registry.entries("local") if e.platform == platform),
                      None)
    dense = {"impl": "xla", "implementation": "cudnn" if platform == "gpu" else "xla"}
    kernels = [(name, {"impl": name}) for name in (lca_kernel, "blockwise") if name]
    return platform, kernels + [(f"xla/{dense['implementation']}", dense)]


def peak(device_kind: str) -> float | None:
    """The chip's dense bfloat16 peak in FLOP/s, matched on the device kind; None if unknown."""
    match = max((k for k in PEAK_TFLOPS if k.lower() in device_kind.lower()), key=len,
                default=None)
    return None if match is None else PEAK_TFLOPS[match] * 1e12


def _program(options, mode):
    fn = lambda q, k, v: lca.attention(q, k, v, causal=True, **options)
    if mode == "fwd":
        return jax.jit(lambda q, k, v, ct: fn(q, k, v))
    loss = lambda q, k, v, ct: (fn(q, k, v).astype(jnp.float32) * ct).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _inputs(heads, kv_heads, seq_len, dtype, device, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(1, seq_len, h, HEAD_DIM) for h in (heads, kv_heads, kv_heads, heads)]
    return [jax.device_put(jnp.asarray(rng.standard_normal(s), dtype), device) for s in shapes]


def check_error(options, heads, kv_heads, device, dtype, seq_len=CHECK_LEN):
    """Max relative error of output and q/k/v gradients (inputs in `dtype` on `device`)
    against the float64 reference of the same inputs on the host CPU."""
    args = _inputs(heads, kv_heads, seq_len, dtype, device, seed=1)
    got = _program(options, "fwd")(*args), *_program(options, "fwd+bwd")(*args)
    cpu = jax.devices("cpu")[0]  # the host backend, present beside the accelerator's
    with jax.enable_x64(True):
        ref_args = [jax.device_put(jnp.asarray(np.asarray(a), jnp.float64), cpu) for a in args]
        ref = (_program({"impl": "reference"}, "fwd")(*ref_args),
               *_program({"impl": "reference"}, "fwd+bwd")(*ref_args))
        return max(float(np.abs(np.asarray(g, np.float64) - np.asarray(r)).max()
                         / np.abs(np.asarray(r)).max()) for g, r in zip(got, ref))


def run(out_dir=None, *, quick=False, devices=None, repeats=5, lengths=None, heads=HEADS,
        dtype=jnp.bfloat16):
    """Measures every (kernel, heads, length, mode) on the first accelerator of `devices`;
    returns the Rows (none without an accelerator) and writes bench_device.csv to out_dir."""
    device = accelerator(devices)
    if device is None:
        print("device part: no accelerator (TPU or GPU) here; nothing measured. Run"
              " `python experiments/bench.py --part device` on a machine with one.")
        return []
    platform, kernels = plan(device)
    lengths = lengths or (QUICK_LENGTHS if quick else LENGTHS)
    chip_peak = peak(device.device_kind)
    rows = []
    todo = [(label, options, h, kv, t, mode) for (h, kv) in heads for label, options in kernels
            for t in lengths for mode in MODES]
    checks = {}
    for label, options, h, kv, t, mode in tqdm(todo, desc=f"device part on {device.device_kind}"):
        if (label, h, kv) not in checks:
            try:
                checks[label, h, kv] = check_error(options, h, kv, device, dtype)
            except Exception as e:  # noqa: BLE001 -- a kernel that fails here fails its rows
                checks[label, h, kv] = float("nan")
                print(f"device part: the float64 check of {label} failed: {_first_line(e)}")
        flops = timing.attention_flops(1, t, t, h, HEAD_DIM, causal=True,
                                       backward=mode != "fwd")
        try:  # a dense kernel at 64k may not fit: a row says so, the part goes on
            args = _inputs(h, kv, t, dtype, device)
            seconds = timing.median_seconds(_program(options, mode), *args, repeats=repeats)
        except Exception as e:  # noqa: BLE001 -- XLA's out-of-memory and compile errors
            rows.append(Row(platform, device.device_kind, label, h, kv, t, mode, None, None,
                            None, checks[label, h, kv], _first_line(e)))
            continue
        rows.append(Row(platform, device.device_kind, label, h, kv, t, mode, seconds,
                        flops / seconds / 1e12,
                        None if chip_peak is None else flops / seconds / chip_peak,
                        checks[label, h, kv]))
    print(table(rows))
    if out_dir is not None:
        write_csv(rows, os.path.join(out_dir, "bench_device.csv"))
    return rows


def _first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:120]


def table(rows) -> str:
    """A markdown table of the rows."""
    lines = ["| kernel | heads | T | mode | ms | TFLOP/s | of peak | error vs f64 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = "" if r.peak_fraction is None else f"{r.peak_fraction:.0%}"
        ms = f"{r.seconds * 1e3:.2f}" if r.seconds is not None else f"did not run: {r.note}"
        tflops = "" if r.tflops is None else f"{r.tflops:.1f}"
        lines.append(f"| {r.kernel} | {r.heads}/{r.kv_heads} | {r.seq_len} | {r.mode} |"
                     f" {ms} | {tflops} | {frac} | {r.check_error:.1e} |")
    return "\n".join(lines)


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
