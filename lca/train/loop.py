"""The training loop: mesh, sharded state, resume, steps, metrics, evaluation, checkpoints."""

from __future__ import annotations

import dataclasses
import os
import time

import jax

from lca.parallel import distributed, make_mesh
from lca.train import checkpoint as ckpt_lib
from lca.train import state as state_lib
from lca.train.config import Experiment, validate
from lca.train.evaluate import Evaluator, train_batches
from lca.train.metrics import MetricsWriter
from lca.train.plots import plot_run


def setup_devices(exp: Experiment) -> None:
    """Asks for `exp.cpu_devices` CPU devices in all, split over the processes (unless
    JAX_NUM_CPU_DEVICES is set); must run before JAX starts a backend."""
    if exp.cpu_devices and not os.environ.get("JAX_NUM_CPU_DEVICES"):
        jax.config.update("jax_num_cpu_devices", distributed.local_cpu_devices(exp.cpu_devices))


def run_mesh(exp: Experiment, devices=None):
    devices = jax.devices() if devices is None else devices
    validate(exp, len(devices))
    return make_mesh(dict(exp.mesh), devices)


@dataclasses.dataclass
class RunResult:
    step: int
    losses: list            # train loss of every step this call ran
    evals: dict             # the last evaluation
    files: dict             # name -> path


def _bar(total, initial, enabled):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def train(exp: Experiment, workdir: str, *, progress: bool = True, stop_at: int | None = None,
          log=print) -> RunResult:
    """Trains (or resumes) `exp` in `workdir`; `stop_at` ends early (as if interrupted).

    Everything that can be wrong with the config or the workdir raises before
    anything compiles or is overwritten.
    """
    mesh = run_mesh(exp)
    t, workdir = exp.train, os.path.abspath(workdir)
    mngr = ckpt_lib.manager(workdir, exp)
    latest = mngr.latest_step()
    if latest is not None:
        ckpt_lib.check_compatible(ckpt_lib.read_config(mngr, latest), exp, workdir)
    ts = state_lib.create(exp, mesh)
    data = train_batches(exp)
    start = 0
    if latest is not None:
        ts, data_state = ckpt_lib.restore_train(mngr, latest, ts, exp)
        data.set_state(data_state)
        start = latest
        log(f"resumed from {ckpt_lib.checkpoint_dir(workdir)} at step {start}")
    step_fn = state_lib.make_train_step(ts, exp)
    evaluator = Evaluator(exp, ts.ctx)
    writer = MetricsWriter(workdir)
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    bar = _bar(t.steps, start, progress and distributed.is_main_process())
    losses, evals = [], {}
    clock, clock_step = time.perf_counter(), start
    for step in range(start + 1, end + 1):
        tokens = t.batch_size * data.length_at(data.index)
        ts.state, metrics = step_fn(ts.state, state_lib.device_batch(next(data), exp, ts.ctx))
        losses.append(metrics["loss"])
        if step % t.log_every == 0 or step == end:
            metrics = jax.device_get({k: v for k, v in metrics.items() if k != "grads_finite"})
            now = time.perf_counter()
            step_time = (now - clock) / max(step - clock_step, 1)
            clock, clock_step = now, step
            writer.write(step, {"train/" + k: v for k, v in metrics.items()} | {
                "train/learning_rate": state_lib.learning_rate_schedule(exp)(step - 1),
                "perf/step_time_s": step_time, "perf/tokens_per_s": tokens / step_time})
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens / step_time:,.0f}",
                                step_s=f"{step_time:.3f}")
        if bar is not None:
            bar.update(1)
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
            evals = evaluator(ts.state[0])
            writer.write(step, evals)
            if bar is not None:
                bar.write(f"step {step}: " + _fmt(evals))
        if step % t.checkpoint_every == 0 or step == end:
            ckpt_lib.save(mngr, step, ts, exp, data.get_state(), force=step == end)
    if bar is not None:
        bar.close()
    if start >= t.steps and latest is not None:
        evals = evaluator(ts.state[0])
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    files = {"checkpoints": ckpt_lib.checkpoint_dir(workdir), "metrics": writer.path,
             "tensorboard": writer.tb_dir}
    if end == t.steps:
        files["figure"] = plot_run(workdir)
    return RunResult(step=end, losses=[float(x) for x in jax.device_get(losses)],
                     evals=evals, files=files)


def _fmt(evals: dict) -> str:
    keys = [k for k in evals if "depth" not in k]
    return ", ".join(f"{k.split('/', 1)[1]}={evals[k]:.4f}" for k in keys)


def summary(result: RunResult, workdir: str) -> str:
    lines = [f"finished at step {result.step} in {os.path.abspath(workdir)}"]
    lines += [f"  {k}: {v:.4f}" for k, v in result.evals.items() if "depth" not in k]
    lines += [f"  {name}: {path}" for name, path in result.files.items()]
    return "\n".join(lines)


__all__ = ["train", "setup_devices", "run_mesh", "summary", "RunResult"]
