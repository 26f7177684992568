"""Training: loss goes down, exact resume, checkpoints restored onto other meshes, bad input."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from lca.data import Passkey, batch_rng
from lca.parallel import make_mesh
from lca.train import evaluate_checkpoint, load, train
from lca.train import state as state_lib
from lca.train.checkpoint import checkpoint_dir
from lca.train.metrics import MetricsWriter
from lca.train.plots import plot_run
from train_runs import experiment, smoke_run


def test_smoke_training_loss_goes_down():
    _, result = smoke_run()
    losses = result.losses
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.5, losses


def test_the_smoke_model_trains_with_usp_as_with_the_ring(tmp_path):
    """configs/passkey.py:smoke,usp: all-to-all over ulysses=2, the ring over sequence=2."""
    exp = experiment("configs/passkey.py:smoke,usp")
    assert exp.model.attention == ("usp",)
    assert dict(exp.mesh) == {"data": 2, "sequence": 2, "ulysses": 2}
    losses = train(exp, str(tmp_path), progress=False, log=lambda *_: None).losses
    _, ring = smoke_run()
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.5, losses  # the ring's bar
    np.testing.assert_allclose(losses, ring.losses, rtol=1e-5)  # the same model, exactly


def test_the_hybrid_trains_on_packed_text(tmp_path):
    """configs/hybrid.py:text,smoke: a linear layer under a ring layer, on packed documents
    (segment ids through both) on the (data, fsdp, sequence) mesh."""
    exp = experiment("configs/hybrid.py:text,smoke")
    assert exp.model.attention == ("linear", "ring") and exp.data.task == "text"
    losses = train(exp, str(tmp_path), progress=False, log=lambda *_: None).losses
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses


def test_run_writes_checkpoints_metrics_tensorboard_and_figure():
    workdir, result = smoke_run()
    assert sorted(os.listdir(checkpoint_dir(workdir))) == ["4", "8"]
    assert os.listdir(os.path.join(workdir, "tb"))
    assert os.path.getsize(os.path.join(workdir, "summary.png")) > 1000
    assert "eval/accuracy" in result.evals and "eval/accuracy_depth/0.0" in result.evals


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    _, full = smoke_run()
    exp = experiment()
    first = train(exp, str(tmp_path), progress=False, stop_at=4, log=lambda *_: None)
    second = train(exp, str(tmp_path), progress=False, log=lambda *_: None)
    np.testing.assert_allclose(first.losses + second.losses, full.losses, rtol=1e-6, atol=0)


def _logits(model, exp, mesh):
    batch = Passkey(exp.data.seq_len, exp.data.key_len, exp.data.vocab_size).batch(
        batch_rng(9, 0), 4)
    ctx = state_lib.context(exp, mesh)
    dev = state_lib.device_batch(batch, exp, ctx)
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, b: state_lib.forward(nnx.merge(graphdef, s), b, ctx))(state, dev)
    from lca.data import from_layout
    return from_layout(np.asarray(out), exp.model.layout, ctx.sequence_shards)


def test_checkpoint_from_2x4_mesh_restores_onto_one_device_and_onto_8(mesh2x4, mesh8):
    workdir, _ = smoke_run()
    on_2x4, exp, step = load(workdir, mesh=mesh2x4)
    on_one, _, _ = load(workdir)
    on_8, _, _ = load(workdir, mesh=mesh8)
    assert step == 8
    assert len(on_one.embed[...].sharding.device_set) == 1
    assert len(on_8.embed[...].sharding.device_set) == 8
    reference = _logits(on_2x4, exp, mesh2x4)
    one = _logits(on_one, exp, make_mesh({"data": 1}, jax.devices()[:1]))
    eight = _logits(on_8, exp, mesh8)
    np.testing.assert_allclose(one, reference, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(eight, reference, rtol=2e-5, atol=2e-5)


def test_evaluate_a_checkpoint_on_another_mesh():
    workdir, result = smoke_run()
    step, metrics = evaluate_checkpoint(workdir, mesh_axes={"sequence": 8})
    assert step == 8
    assert metrics == pytest.approx(result.evals)


def test_generated_passkey_accuracy_is_the_scored_one_and_is_drawn(tmp_path):
    """Greedy generation gets every digit right exactly when the argmax of one forward does
    (each step's input is then the true digit), so at the lengths both score they agree."""
    workdir, _ = smoke_run()
    step, metrics = evaluate_checkpoint(workdir, mesh_axes={"sequence": 8},
                                        generate_multiples=(1, 2))
    assert metrics["eval/generated_accuracy@64"] == metrics["eval/accuracy@64"]
    assert 0 <= metrics["eval/generated_accuracy@128"] <= 1
    run = shutil.copytree(workdir, tmp_path / "run")
    writer = MetricsWriter(str(run), tensorboard=False, enabled=True)
    writer.write(step, {k: v for k, v in metrics.items() if "generated" in k})
    writer.close()
    os.remove(run / "summary.png")
    assert os.path.exists(plot_run(str(run)))


def test_workdir_with_another_model_shape_is_refused_before_overwriting():
    workdir, _ = smoke_run()
    before = sorted(os.listdir(checkpoint_dir(workdir)))
    with pytest.raises(ValueError, match=r"different model shape.*'embed': \(32, 48\)"):
        train(experiment(**{"model.embed": 48}), workdir, progress=False)
    assert sorted(os.listdir(checkpoint_dir(workdir))) == before


@pytest.mark.parametrize("override,message", [
    ({"model.attention": "flash"}, r"config.model.attention names unknown kernel 'flash'"),
    ({"model.layout": "spiral"}, r"config.model.layout 'spiral' is unknown"),
    ({"mesh": {"data": 2, "seq": 4}}, r"config.mesh names unknown axis 'seq'"),
    ({"sharding.activations": (("length", "sequnce"),)}, r"unknown mesh axis 'sequnce'"),
    ({"model.kv_heads": 3}, r"config.model.heads \(2\) must be a multiple of"),
])
def test_bad_config_names_the_option(override, message):
    with pytest.raises(ValueError, match=message):
        experiment(**override)


@pytest.mark.parametrize("override,message", [
    ({"mesh": {"data": 3, "sequence": 2}}, r"config.mesh .* multiply to 6, but there are 8"),
    ({"train.batch_size": 3}, r"config.train.batch_size \(3\) must be a multiple"),
    ({"data.seq_len": 60}, r"seq_len.*does not fit layout='zigzag' over 4 shards"),
])
def test_bad_sizes_are_refused_before_compiling(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train(experiment(**override), str(tmp_path), progress=False)
    assert not os.path.exists(checkpoint_dir(str(tmp_path)))
