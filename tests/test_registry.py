"""The registry: one table names every kernel; a new local kernel needs it alone.

A kernel registered here (a small wrapper of the dense reference) runs under
every strategy, trains the model under the ring, and is in the benchmark
suite's kernel list, with no other lca file edited.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ring_cases import check_against_reference, strategy_case
from train_runs import experiment

import lca
from lca.bench import kernels as bench_kernels
from lca.kernels import Supports, platform, reference, registry
from lca.train import state as state_lib
from lca.train.evaluate import make_task


@pytest.fixture
def registered():
    """Registers kernels for one test and removes them after it."""
    names = []

    def register(entry):
        names.append(registry.register(entry).name)
        return entry

    yield register
    for name in names:
        registry.unregister(name)


def _wrapper(name, **supports):
    """A new local kernel: the dense reference under another name, calls counted."""
    calls = []

    def forward(cfg, q, k, v, arrays):
        calls.append("forward")
        return reference.forward(cfg, q, k, v, arrays)

    kernel = dataclasses.replace(reference.KERNEL, name=name, forward=forward, direct=None,
                                 bench=True, supports=Supports(**supports), doc="a test kernel")
    return kernel, calls


def test_a_name_registered_twice_raises(registered):
    registered(_wrapper("twice")[0])
    with pytest.raises(ValueError, match="'twice' is already registered"):
        registry.register(_wrapper("twice")[0])
    with pytest.raises(ValueError, match="'blockwise' is already registered"):
        registry.register(_wrapper("blockwise")[0])


def test_every_kind_is_listed_once():
    names = registry.names()
    assert len(names) == len(set(names))
    assert {registry.get(n).kind for n in names} == set(registry.KINDS)
    assert registry.DEFAULT_LOCAL in registry.names("local")
    assert registry.DEFAULT_STRATEGY in registry.names("strategy")


@pytest.mark.parametrize("supports,call,message", [
    ({"masks": ("causal",)}, {"causal": True, "window": 8}, "does not support window masks"),
    ({"dtypes": ("float32",)}, {"dtype": jnp.bfloat16}, r"does not support dtype bfloat16"),
    ({"grouped_heads": False}, {}, r"grouped-query heads \(4 query heads, 2 kv heads\)"),
    ({"length_multiple": 128}, {}, r"lengths \d+ / \d+ \(they must be multiples of 128; the nearest that work: 128 / 128\)"),
])
def test_an_unsupported_call_names_the_kernel_and_what_would_work(registered, supports, call,
                                                                   message):
    kernel, calls = _wrapper("picky", **supports)
    registered(kernel)
    dtype = call.pop("dtype", jnp.float32)
    q, kv = jnp.zeros((2, 64, 4, 8), dtype), jnp.zeros((2, 64, 2, 8), dtype)
    full = rf"local kernel 'picky' does not support .*; local kernels that would work: \[.*'blockwise'"
    for run in (lambda: lca.attention(q, kv, kv, impl="picky", **call),
                lambda: lca.sequence_parallel_attention(
                    q, kv, kv, mesh=lca.parallel.make_mesh({"sequence": 8}), local="picky",
                    **call)):
        with pytest.raises(ValueError, match=message):
            run()
        with pytest.raises(ValueError, match=full):
            run()
    assert not calls  # refused before anything was traced


@pytest.mark.parametrize("impl", registry.names("strategy"))
def test_a_registered_local_kernel_runs_under_every_strategy(registered, impl):
    kernel, calls = _wrapper("mine")
    registered(kernel)
    mesh, options, heads, kv_heads = strategy_case(impl)
    check_against_reference(mesh, "zigzag", "causal_segments", kv_heads, impl=impl,
                            local="mine", heads=heads, fast_compile=True, **options)
    assert calls


def test_a_registered_local_kernel_trains_the_model_under_the_ring(registered, mesh2x4):
    """One training step with it under `ring` on (2, 4): its loss is the blockwise model's."""
    registered(_wrapper("mine")[0])
    exp = experiment(**{"model.local": "mine"})
    assert exp.model.attention == ("ring",) and dict(exp.mesh) == {"data": 2, "sequence": 4}
    ts = state_lib.create(exp, mesh2x4)
    batch = state_lib.device_batch(
        make_task(exp).batch(np.random.default_rng(0), exp.train.batch_size), exp, ts.ctx)
    state, metrics = state_lib.make_train_step(ts)(jax.tree.map(jnp.copy, ts.state), batch)
    assert bool(metrics["finite"])
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state),
                                                         jax.tree.leaves(ts.state))]
    assert max(moved) > 0  # the step updated the parameters

    blockwise = dataclasses.replace(exp, model=exp.model.replace(local=registry.DEFAULT_LOCAL))
    graphdef = state_lib.abstract_state(blockwise, mesh2x4)[0]
    loss = jax.jit(lambda s, b: state_lib.loss_and_metrics(
        nnx.merge(graphdef, s)[0], b, ts.ctx)[0])(ts.state, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-5)


def test_a_registered_local_kernel_is_in_the_benchmark_suites_list(registered):
    registered(_wrapper("mine")[0])
    listed = bench_kernels.default_kernels()
    assert "mine" in listed["single"]
    assert {(k.impl, k.local) for k in listed["mesh"].values()} >= {
        (s, "mine") for s in registry.names("strategy")}


def test_a_config_naming_an_unsupporting_local_kernel_is_refused(registered):
    registered(_wrapper("no_window", masks=("causal",))[0])
    with pytest.raises(ValueError, match=r"config.model.local='no_window': local kernel"
                                         r" 'no_window' does not support window masks"):
        experiment(**{"model.local": "no_window", "model.window": 16})
    with pytest.raises(ValueError, match=r"config.model.local names unknown local kernel 'flash'"):
        experiment(**{"model.local": "flash"})


def test_auto_names_the_kernel_written_for_the_platform():
    """local="auto": blockwise on this CPU, splash on TPU, pallas_gpu on GPU; a config
    resolves it once, so the run records the kernel it ran."""
    assert registry.auto_local() == "blockwise"
    assert registry.local_kernel("auto").name == "blockwise"
    for target, name in (("tpu", "splash"), ("gpu", "pallas_gpu")):
        with platform.lowering_for(target):
            assert registry.auto_local() == name
            assert registry.get(name).platform == target
    exp = experiment(**{"model.local": "auto", "model.attention": "auto"})
    assert (exp.model.local, exp.model.attention) == ("blockwise", ("blockwise",))


def test_an_accelerator_kernel_off_its_platform_runs_interpreted_and_says_so_once():
    platform._WARNED.discard("some_tpu_kernel")
    with pytest.warns(UserWarning, match="'some_tpu_kernel' is a TPU kernel and runs in Pallas"
                                         " interpret mode on cpu"):
        assert platform.interpret("some_tpu_kernel", "tpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert platform.interpret("some_tpu_kernel", "tpu")  # once: no second warning
    with platform.lowering_for("tpu"):
        assert not platform.interpret("some_tpu_kernel", "tpu")
