"""The training loop: mesh, sharded state, resume, steps, metrics, evaluation, checkpoints."""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time

import jax

from lca.parallel import distributed, make_mesh
from lca.train import checkpoint as ckpt_lib
from lca.train import state as state_lib
from lca.train.config import Experiment, validate
from lca.train.evaluate import Evaluator, train_batches
from lca.train.metrics import MetricsWriter
from lca.train.plots import plot_run
from lca.train.preemption import Preemption


def setup_devices(exp: Experiment) -> None:
    """Asks for `exp.cpu_devices` CPU devices in all, split over the processes (unless
    JAX_NUM_CPU_DEVICES is set); must run before JAX starts a backend."""
    if exp.cpu_devices and not os.environ.get("JAX_NUM_CPU_DEVICES"):
        jax.config.update("jax_num_cpu_devices", distributed.local_cpu_devices(exp.cpu_devices))


def run_mesh(exp: Experiment, devices=None):
    devices = jax.devices() if devices is None else devices
    validate(exp, len(devices))
    return make_mesh(dict(exp.mesh), devices, dcn=dict(exp.dcn), dcn_name="config.dcn")


@dataclasses.dataclass
class RunResult:
    step: int
    losses: list            # train loss of every step this call ran
    evals: dict             # the last evaluation
    files: dict             # name -> path
    stopped_by: str | None = None   # e.g. "SIGTERM" when a signal ended the run early
    skipped_steps: int = 0  # updates skipped for a non-finite loss/gradient (on_nonfinite="skip")


def _bar(total, initial, enabled):
    """A progress bar on a terminal; None (plain log lines instead) for a file or a pipe."""
    if not enabled or not sys.stdout.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def progress_line(step, steps, loss, tokens_per_s, step_time, elapsed):
    """One plain line per `log_every` steps: what a log file or a scheduler shows."""
    clock = lambda s: str(datetime.timedelta(seconds=round(s)))
    return (f"step {step}/{steps}  loss {loss:.4f}  tokens/s {tokens_per_s:,.0f}"
            f"  step {step_time:.3f} s  elapsed {clock(elapsed)}"
            f"  eta {clock(step_time * (steps - step))}")


def prepare(exp: Experiment, workdir: str, log=print):
    """Every check of the config and the workdir; reads, writes nothing, compiles nothing.

    Returns (mesh, what `checkpoint.scan` found). Raises a ValueError naming the
    option for a bad config, a mesh that does not fit the devices, or a
    workdir whose checkpoint has another model shape or kernel set.
    """
    mesh = run_mesh(exp)
    found = ckpt_lib.scan(workdir)
    saved, _ = ckpt_lib.newest_readable_config(workdir, found, log)
    if saved is not None:
        ckpt_lib.check_compatible(saved, exp, workdir)
    return mesh, found


def _resume(mngr, found, ts, exp, data, workdir, log):
    """Restores the newest checkpoint that restores; sets damaged ones aside. Returns (ts, step)."""
    for path in found.incomplete:
        ckpt_lib.set_aside(workdir, path, "incomplete (a save was interrupted)", log)
    for step in found.steps:
        why = found.unreadable.get(step)
        if why is None:
            try:
                ts_restored, data_state = ckpt_lib.restore_train(mngr, step, ts, exp)
            except Exception as e:  # noqa: BLE001 (any failure to read back means: not usable)
                why = ckpt_lib.why(e)
        if why is not None:
            ckpt_lib.set_aside(workdir, os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step)),
                               f"unreadable ({why})", log)
            mngr.reload()
            continue
        ts = ts_restored
        data.set_state(data_state)
        log(f"resumed from {ckpt_lib.checkpoint_dir(workdir)} at step {step}")
        return ts, step
    if found.steps:
        log("WARNING: no checkpoint could be restored; training from step 0")
    return ts, 0


def _compile_key(exp: Experiment) -> Experiment:
    """`exp` without the options only the host reads, so that runs differing in them
    share the per-process caches of compiled initialisers and train steps."""
    return dataclasses.replace(exp, train=dataclasses.replace(exp.train, on_nonfinite="stop"))


def nonfinite_message(step: int, metrics: dict, ts) -> str:
    """'step N: non-finite loss ...; first non-finite gradient in <path>'."""
    flags = jax.device_get(metrics["grads_finite"])
    names = state_lib.grad_leaf_names(ts)
    bad = [name for name, ok in zip(names, flags) if not ok]
    where = (f"first non-finite gradient in layer {bad[0]} ({len(bad)} of {len(names)} leaves)"
             if bad else "all gradients finite")
    return (f"step {step}: non-finite loss or gradient (loss={float(metrics['loss'])},"
            f" grad_norm={float(metrics['grad_norm'])}); {where}")


def train(exp: Experiment, workdir: str, *, progress: bool = True, stop_at: int | None = None,
          log=print, command: str | None = None) -> RunResult:
    """Trains (or resumes) `exp` in `workdir`; `stop_at` ends early (as if interrupted).

    Everything that can be wrong with the config or the workdir raises before
    anything compiles or is overwritten (`prepare`). Resumes from the newest
    checkpoint that restores; incomplete or unreadable ones are moved to
    `checkpoints_unusable/` with a warning. SIGTERM or SIGINT ends the run
    after the current step with a checkpoint (`RunResult.stopped_by`);
    `command`, the command line that started the run, goes into the message
    that says how to resume. A non-finite loss or gradient raises a
    FloatingPointError naming the step and layer, without a checkpoint of
    that state, or with `train.on_nonfinite="skip"` leaves the state as it
    was and counts the step in `train/skipped_steps`.
    """
    t, workdir = exp.train, os.path.abspath(workdir)
    mesh, found = prepare(exp, workdir, log)
    compiled = _compile_key(exp)
    ts = state_lib.create(compiled, mesh)
    mngr = ckpt_lib.manager(workdir, exp)
    data = train_batches(exp)
    ts, start = _resume(mngr, found, ts, exp, data, workdir, log)
    step_fn = state_lib.make_train_step(ts, compiled)
    evaluator = Evaluator(exp, ts.ctx)
    writer = MetricsWriter(workdir)
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    main = distributed.is_main_process()
    bar = _bar(t.steps, start, progress and main)
    plain = log if bar is None and main else (lambda line: None)  # lines for files, schedulers
    losses, evals, skipped, stopped_by, step = [], {}, 0, None, start
    clock, clock_step = time.perf_counter(), start
    began = clock
    try:
        with Preemption() as preemption:
            for step in range(start + 1, end + 1):
                tokens = t.batch_size * data.length_at(data.index)
                ts.state, metrics = step_fn(ts.state,
                                            state_lib.device_batch(next(data), exp, ts.ctx))
                losses.append(metrics["loss"])
                if not bool(metrics["finite"]):  # one scalar read per step
                    message = nonfinite_message(step, metrics, ts)
                    if t.on_nonfinite == "stop":
                        raise FloatingPointError(
                            f"{message}. Stopped without writing a checkpoint; the newest"
                            f" checkpoint is in {ckpt_lib.checkpoint_dir(workdir)}. Lower"
                            " config.train.learning_rate, or set config.train.on_nonfinite="
                            "'skip' to skip such updates")
                    skipped += 1
                    log(f"WARNING: {message}; update skipped (config.train.on_nonfinite='skip')")
                if step % t.log_every == 0 or step == end:
                    metrics = jax.device_get({k: v for k, v in metrics.items()
                                              if k not in ("grads_finite", "finite")})
                    now = time.perf_counter()
                    step_time = (now - clock) / max(step - clock_step, 1)
                    clock, clock_step = now, step
                    writer.write(step, {"train/" + k: v for k, v in metrics.items()} | {
                        "train/learning_rate": state_lib.learning_rate_schedule(exp)(step - 1),
                        "train/skipped_steps": skipped,
                        "perf/step_time_s": step_time, "perf/tokens_per_s": tokens / step_time})
                    if bar is not None:
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                        tok_s=f"{tokens / step_time:,.0f}",
                                        step_s=f"{step_time:.3f}")
                    plain(progress_line(step, t.steps, float(metrics["loss"]),
                                        tokens / step_time, step_time, now - began))
                if bar is not None:
                    bar.update(1)
                stop = preemption.should_stop(step)
                if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                    evals = evaluator(ts.state[0])
                    writer.write(step, evals)
                    (bar.write if bar is not None else plain)(f"step {step}: " + _fmt(evals))
                if step % t.checkpoint_every == 0 or step == end or stop:
                    ckpt_lib.save(mngr, step, ts, exp, data.get_state(), force=step == end or stop)
                if stop:
                    stopped_by = preemption.signal_name
                    break
        if bar is not None:
            bar.close()
            bar = None
        if start >= t.steps and found.steps:
            evals = evaluator(ts.state[0])
    finally:
        if bar is not None:
            bar.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    files = {"checkpoints": ckpt_lib.checkpoint_dir(workdir), "metrics": writer.path,
             "tensorboard": writer.tb_dir}
    if stopped_by is not None:
        log(f"stopped by {stopped_by} after step {step}: saved step {step} to"
            f" {ckpt_lib.checkpoint_dir(workdir)}; resume with: "
            + (command or f"the same command (train() with workdir={workdir!r})"))
    elif end == t.steps:
        files["figure"] = plot_run(workdir)
    return RunResult(step=step if stopped_by else end,
                     losses=[float(x) for x in jax.device_get(losses)],
                     evals=evals, files=files, stopped_by=stopped_by, skipped_steps=skipped)


def _fmt(evals: dict) -> str:
    keys = [k for k in evals if "depth" not in k]
    return ", ".join(f"{k.split('/', 1)[1]}={evals[k]:.4f}" for k in keys)


def summary(result: RunResult, workdir: str) -> str:
    how = f"stopped by {result.stopped_by}" if result.stopped_by else "finished"
    lines = [f"{how} at step {result.step} in {os.path.abspath(workdir)}"]
    if result.skipped_steps:
        lines.append(f"  skipped updates (non-finite): {result.skipped_steps}")
    lines += [f"  {k}: {v:.4f}" for k, v in result.evals.items() if "depth" not in k]
    lines += [f"  {name}: {path}" for name, path in result.files.items()]
    return "\n".join(lines)


__all__ = ["train", "prepare", "setup_devices", "run_mesh", "summary", "RunResult"]
