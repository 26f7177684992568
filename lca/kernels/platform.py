"""Which platform an accelerator kernel is built for, and when it runs interpreted.

A Pallas kernel is written for one platform ("tpu": splash; "gpu": lca's
pallas_gpu). Traced on that platform it lowers to the platform's custom call
(Mosaic, Triton). Traced anywhere else it runs in Pallas interpret mode: the
same kernel code on the host, exact and slow, for tests; the first such call
of each kernel says so once.

`lowering_for(platform)` makes kernels lower for `platform` whatever the
local backend is: what `jax.export(..., platforms=[...])` needs to lower a
TPU or GPU program on a CPU-only machine.

    with platform.lowering_for("tpu"):
        exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
"""

from __future__ import annotations

import contextlib
import warnings

import jax

_TARGET: list[str] = []
_WARNED: set[str] = set()


def _backend_platform() -> str:
    backend = jax.default_backend()
    return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def current() -> str:
    """The platform kernels are being built for: `lowering_for`'s, else the backend's."""
    return _TARGET[-1] if _TARGET else _backend_platform()


@contextlib.contextmanager
def lowering_for(platform: str):
    """Kernels traced inside lower for `platform` ("tpu" or "gpu"), never interpreted."""
    if platform not in ("tpu", "gpu"):
        raise ValueError(f"platform must be 'tpu' or 'gpu'; got {platform!r}")
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def interpret(kernel: str, platform: str) -> bool:
    """Whether `kernel` (written for `platform`) runs in interpret mode here; warns once."""
    if current() == platform:
        return False
    if kernel not in _WARNED:
        _WARNED.add(kernel)
        warnings.warn(f"local kernel {kernel!r} is a {platform.upper()} kernel and runs in"
                      f" Pallas interpret mode on {current()} (exact, slow: for tests)",
                      stacklevel=3)
    return True
