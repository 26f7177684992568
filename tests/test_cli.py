"""The command lines as a user meets them: a refusal is one line and exit status 2.

(Logs that read in a file: tests/test_train_robust.py, on its command-line run.)"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, os.path.join(REPO, "experiments", "train.py"), "--config",
         "configs/passkey.py:smoke"]
EVALUATE = [sys.executable, os.path.join(REPO, "experiments", "evaluate.py")]


def _run(cmd, stdout=subprocess.PIPE):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("LCA_TRACEBACK", None)
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          env=env, timeout=300)


REFUSALS = [
    (TRAIN + ["--workdir", "W", "--config.train.step=5"],
     r"unknown option config.train.step; config.train has: .*did you mean config.train.steps\?"),
    (TRAIN + ["--workdir", "W", "--config.mesh.seq=4"],
     r"unknown option config.mesh.seq; config.mesh has: data, sequence"),
    (TRAIN + ["--workdir", "W", "--config.model.window=-3"],
     r"config.model.window is -3; it must be an integer >= 0"),
    (TRAIN + ["--workdir", "W", "--config.model.attention=flash"],
     r"config.model.attention names unknown kernel 'flash'; known: \[.*'ring'"),
    (TRAIN + ["--workdir", "W", "--config.model.local=xla"],
     r"config.model.local='xla': local kernel 'xla' does not support strategy 'ring'"),
    (TRAIN + ["--workdir", "W", "--config.train.steps=abc"], r"steps"),
    (TRAIN + ["--workdir", "W", "--config.mesh.data=3"],
     r"config.mesh .* multiply to 12, but there are 8 devices"),
    (TRAIN[:2] + ["--config", "configs/nope.py", "--workdir", "W"],
     r"--config: no config file at 'configs/nope.py'"),
    (TRAIN, r"--workdir must have a value"),
    (TRAIN + ["--workdir", "W", "--coordinator_address", "nohost"],
     r"coordinator address 'nohost' must be HOST:PORT"),
    (TRAIN + ["--workdir", "W", "--num_processes", "2"],
     r"process_id|JAX_PROCESS_ID"),
    (EVALUATE + ["--workdir", "W", "--mesh", "seq=8"],
     r"--mesh: unknown axis 'seq'; axes: data, fsdp, sequence, tensor \(did you mean sequence\?\)"),
    (EVALUATE + ["--workdir", "W", "--mesh", "banana"],
     r"--mesh 'banana': expected AXIS=SIZE\[,AXIS=SIZE...\]"),
]


@pytest.mark.parametrize("cmd,message", REFUSALS, ids=[" ".join(c[2:]) for c, _ in REFUSALS])
def test_a_refusal_is_one_line_on_stderr_and_exit_status_2(cmd, message, tmp_path):
    cmd = [str(tmp_path / "w") if part == "W" else part for part in cmd]
    result = _run(cmd)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_the_traceback_is_there_when_asked_for(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, LCA_TRACEBACK="1")
    result = subprocess.run(TRAIN + ["--workdir", str(tmp_path), "--config.model.window=-3"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_generate_runs_on_a_checkpoint_and_refuses_text_for_a_passkey_model():
    from train_runs import smoke_run  # noqa: PLC0415 (a training run, only for this test)

    workdir, _ = smoke_run()
    command = [sys.executable, os.path.join(REPO, "experiments", "generate.py"), "--workdir",
               workdir]
    result = _run(command + ["--mesh", "sequence=8", "--cpu_devices", "8"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "to generate on mesh {'sequence': 8}" in result.stdout
    assert "model says   :" in result.stdout and "hidden answer:" in result.stdout
    refused = _run(command + ["--prompt", "hello"])
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        "error: this run's task is 'passkey'"), refused.stderr[-2000:]
