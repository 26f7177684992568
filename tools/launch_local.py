"""Rehearse a multi-host run on one machine: N processes on loopback, CPU devices, gloo.

    python tools/launch_local.py -n 2 -- python experiments/train.py \
        --config configs/passkey.py:smoke --workdir /tmp/lca_mp

starts `python experiments/train.py ...` twice (a leading `python` or
`python3` is this launcher's own interpreter, so the processes run in the
environment it runs in), with JAX_COORDINATOR_ADDRESS=
127.0.0.1:PORT, JAX_NUM_PROCESSES=2 and JAX_PROCESS_ID=0 or 1 (read by
`lca.parallel.distributed.initialize`), and JAX_PLATFORMS=cpu. Each process
asks for the config's `cpu_devices` divided by the process count, unless
`--devices_per_process K` sets JAX_NUM_CPU_DEVICES=K. Output lines are
prefixed with `[p0]`, `[p1]`, ... When a process fails the others are
stopped, and the launcher exits with the first non-zero exit code.

Standard library only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, port: int,
                devices_per_process: int | None, platform: str) -> dict:
    env = dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id),
               PYTHONUNBUFFERED="1")
    if platform:
        env["JAX_PLATFORMS"] = platform
    if devices_per_process:
        env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    return env


def _forward(stream, prefix: str, out, lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            out.flush()
    stream.close()


def launch(cmd: list[str], num_processes: int, *, port: int | None = None,
           devices_per_process: int | None = None, platform: str = "cpu",
           out=sys.stdout) -> int:
    """Runs `cmd` as `num_processes` processes; returns the first non-zero exit code, else 0."""
    if num_processes < 1:
        raise ValueError(f"-n must be >= 1; got {num_processes}")
    if not cmd:
        raise ValueError("no command given; put it after `--`")
    if cmd[0] in ("python", "python3"):
        cmd = [sys.executable, *cmd[1:]]
    port = port or free_port()
    lock = threading.Lock()
    procs, threads = [], []
    for i in range(num_processes):
        p = subprocess.Popen(cmd, env=process_env(os.environ, i, num_processes, port,
                                                  devices_per_process, platform),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        t = threading.Thread(target=_forward, args=(p.stdout, f"[p{i}]", out, lock), daemon=True)
        t.start()
        procs.append(p)
        threads.append(t)
    code = 0
    try:
        running = set(range(num_processes))
        while running:
            for i in sorted(running):
                rc = procs[i].poll()
                if rc is None:
                    continue
                running.discard(i)
                if rc != 0 and code == 0:
                    code = rc
                    with lock:
                        out.write(f"[launch] process {i} exited with {rc}; stopping the others\n")
                    _stop(procs[j] for j in running)
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        code = code or 130
    for t in threads:
        t.join(timeout=5)
    return code


def _stop(procs) -> None:
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="launch_local.py -n N [--devices_per_process K] [--port P] -- cmd ...")
    parser.add_argument("-n", "--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="CPU devices per process (JAX_NUM_CPU_DEVICES)")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--platform", default="cpu",
                        help="JAX_PLATFORMS for the processes ('' keeps the environment's)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    try:
        return launch(cmd, args.num_processes, port=args.port,
                      devices_per_process=args.devices_per_process, platform=args.platform)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
