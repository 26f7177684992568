"""Multi-controller runs: `jax.distributed.initialize` from flags or environment variables.

One Python process per host (TPU pod, GPU cluster) or several on one machine
(`tools/launch_local.py`, CPU devices with gloo collectives). Every process
runs the same program on the same global arrays; each holds the shards of
its own devices.

Settings, first found wins:

- arguments (`experiments/train.py --coordinator_address --num_processes --process_id`);
- `JAX_COORDINATOR_ADDRESS` (read by JAX itself), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
- with `auto=True` (`--distributed`), whatever JAX detects itself on a Cloud
  TPU VM, under SLURM, Open MPI or Kubernetes.

With none of these, the run is single-process and nothing is initialised.
Call `initialize` before anything touches JAX devices.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_NUM_PROCESSES = 1  # as initialised here; readable before any backend starts


def _from_env(name: str, value, kind=str):
    if value is not None:
        return value
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an {kind.__name__}") from None


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> tuple[str | None, int | None, int | None]:
    """(coordinator address, process count, process id), arguments before environment
    variables; raises a ValueError naming the bad or missing setting."""
    address = _from_env(ENV_COORDINATOR, coordinator_address)
    count = _from_env(ENV_NUM_PROCESSES, num_processes, int)
    pid = _from_env(ENV_PROCESS_ID, process_id, int)
    if address is not None:
        host, sep, port = address.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise ValueError(f"coordinator address {address!r} must be HOST:PORT,"
                             " e.g. 10.0.0.2:1234 (the host of process 0)")
    if count is not None and count < 1:
        raise ValueError(f"num_processes must be >= 1; got {count}")
    if pid is not None and pid < 0:
        raise ValueError(f"process_id must be >= 0; got {pid}")
    if count is not None and pid is not None and pid >= count:
        raise ValueError(f"process_id {pid} is out of range for num_processes {count}"
                         f" (ids are 0..{count - 1})")
    return address, count, pid


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> int:
    """Starts the multi-controller runtime when settings say so; returns the process count.

    Single-process (returns 1, does nothing) when no setting is given and
    `auto` is False. Given some settings, all three are needed unless `auto`,
    which lets JAX fill in the rest from the cluster it runs on. CPU
    collectives between processes use gloo.
    """
    global _NUM_PROCESSES
    address, count, pid = settings(coordinator_address, num_processes, process_id)
    given = {"coordinator_address": address, "num_processes": count, "process_id": pid}
    if not auto:
        if all(v is None for v in given.values()):
            return 1
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"multi-process run needs {', '.join(missing)} as well (flags --{missing[0]}"
                f" ..., or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID});"
                " or pass --distributed to let JAX detect a TPU pod or SLURM job")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, count, pid)
    # Not jax.process_count(): that would start the backends before the CPU
    # device count is set.
    from jax._src import distributed as jax_distributed  # noqa: PLC0415
    _NUM_PROCESSES = int(jax_distributed.global_state.num_processes)
    return _NUM_PROCESSES


def num_processes() -> int:
    """Processes in this run as set up by `initialize` (1 if it was not called)."""
    return _NUM_PROCESSES


def local_cpu_devices(total: int) -> int:
    """CPU devices this process asks for so that all processes hold `total` between them.

    Never raises: on a TPU or GPU pod the CPU count does not matter, and on CPU
    a count that does not split shows up as a mesh that does not fit.
    """
    return max(total // num_processes(), 1)


def is_main_process() -> bool:
    """True on process 0, the one that writes metrics, figures and progress."""
    return jax.process_index() == 0


__all__ = ["initialize", "settings", "num_processes", "local_cpu_devices", "is_main_process"]
