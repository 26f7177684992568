"""The model: same parameters -> same logits, loss and gradients for every kernel, layout and mesh.

Reference: the `xla` kernel on one device, natural token order. Every other
(kernel, layout, mesh) permutes the batch once at the input
(`lca.data.to_layout`), runs, and maps logits back. Tolerance (float32, fixed):
max |difference| <= 2e-5 x max |reference| per array (different summation
orders, never loosened to pass).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca.data import Passkey, StdlibText, batch_rng, from_layout, to_layout
from lca.models import LinearOptions, ModelConfig, Transformer, cross_entropy
from lca.parallel.sharding import ShardingContext

RTOL = 2e-5
ACT_RULES = (("batch", ("data", "fsdp")), ("length", ("sequence", "ulysses")),
             ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))

TINY = ModelConfig(vocab_size=48, embed=32, layers=1, heads=4, kv_heads=2, head_dim=8, mlp=64,
                   attention=("xla",), block_q=8, block_k=8)


def _batch(seq_len=64, batch=2, seed=0):
    return Passkey(seq_len, key_len=3, vocab_size=48).batch(batch_rng(seed, 0), batch)


def _text_batch(seq_len=64, batch=2):
    """Packed stdlib bytes: several documents per row, segment ids, restarting positions."""
    b = StdlibText(seq_len, max_bytes=50_000).batch(batch_rng(0, 0), batch,
                                                    indices=np.array([3, 40]))
    b["tokens"], b["targets"] = b["tokens"] % 48, b["targets"] % 48  # TINY's vocabulary
    return b


def _run(config, batch, mesh=None):
    """(natural-order logits, loss, grads) for `config` on `mesh` (None: one device)."""
    model = Transformer(config, rngs=nnx.Rngs(0))
    shards = 1 if mesh is None else dict(mesh.shape).get("sequence", 1)
    ctx = ShardingContext(mesh, ACT_RULES) if mesh is not None else None
    arrays = {k: jnp.asarray(v) for k, v in to_layout(batch, config.layout, shards).items()
              if k != "depth"}
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state):
        def loss_fn(state):
            logits = nnx.merge(graphdef, state)(arrays["tokens"], arrays["positions"],
                                                arrays.get("segment_ids"), ctx=ctx)
            total, weight, _ = cross_entropy(logits, arrays["targets"], arrays["weights"])
            return total / weight, logits
        return jax.value_and_grad(loss_fn, has_aux=True)(state)

    (loss, logits), grads = f(state)
    logits = from_layout(np.asarray(logits), config.layout, shards)
    return logits, float(loss), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))


def _close(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
    assert err <= RTOL, f"{what}: relative max error {err:.2e} > {RTOL:.0e}"


@pytest.fixture(scope="module")
def reference():
    return _run(TINY, _batch())


def _check(result, reference, label):
    logits, loss, grads = result
    _close(logits, reference[0], f"{label} logits")
    _close(loss, reference[1], f"{label} loss")
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(reference[2])[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        _close(g, flat_ref[path], f"{label} grad {jax.tree_util.keystr(path)}")


def test_blockwise_matches_xla_on_one_device(reference):
    _check(_run(TINY.replace(attention=("blockwise",)), _batch()), reference, "blockwise")


@pytest.fixture(scope="module")
def mesh_usp():
    """(data 2, ulysses 2, sequence 2): all-to-all over ulysses, the ring over sequence."""
    from lca.parallel import make_mesh
    return make_mesh({"data": 2, "ulysses": 2, "sequence": 2})


@pytest.mark.parametrize("kernel,layout,mesh_name", [
    ("xla", "contiguous", "mesh2x4"), ("blockwise", "zigzag", "mesh2x4"),
    ("ring", "contiguous", "mesh2x4"), ("ring", "striped", "mesh2x4"),
    ("ring", "zigzag", "mesh2x4"), ("ring", "zigzag", "mesh8"),
    ("allgather", "striped", "mesh8"), ("ulysses", "zigzag", "mesh2x4"),
    ("usp", "zigzag", "mesh_usp")])
def test_every_kernel_layout_and_mesh_gives_the_same_model(kernel, layout, mesh_name, reference,
                                                           request):
    mesh = request.getfixturevalue(mesh_name)
    config = TINY.replace(attention=(kernel,), layout=layout)
    _check(_run(config, _batch(), mesh), reference, f"{kernel}/{layout}/{mesh_name}")


def test_packed_documents_give_the_same_model_with_ring_as_with_xla(mesh2x4):
    batch = _text_batch()
    assert len(np.unique(batch["segment_ids"][0])) > 1
    _check(_run(TINY.replace(attention=("ring",), layout="zigzag"), batch, mesh2x4),
           _run(TINY, batch), "ring/zigzag/2x4 with segment ids")


def test_remat_and_tensor_parallel_mesh_change_nothing(reference, mesh2x2x2):
    config = TINY.replace(attention=("blockwise",), remat=True)
    _check(_run(config, _batch(), mesh2x2x2), reference, "blockwise+remat/2x2x2")


def _causality_grads(config, mesh, t):
    """d(sum of logits at natural position t) / d(input embeddings), natural order [T]."""
    batch = _batch(seq_len=32, batch=2)
    shards = 1 if mesh is None else dict(mesh.shape)["sequence"]
    arrays = to_layout(batch, config.layout, shards)
    model = Transformer(config, rngs=nnx.Rngs(1))
    ctx = ShardingContext(mesh, ACT_RULES) if mesh is not None else None
    x = model.embed_tokens(jnp.asarray(arrays["tokens"]))
    slot = int(np.nonzero(arrays["positions"][0] == t)[0][0])  # where token t sits in layout

    def out(x):
        return model.from_embeddings(x, jnp.asarray(arrays["positions"]), ctx=ctx)[:, slot].sum()

    g = jax.jit(jax.grad(out))(x)
    return from_layout(np.abs(np.asarray(g)).sum(axis=(0, 2)), config.layout, shards, axis=0)


@pytest.mark.parametrize("kernel,layout,mesh_name", [
    ("blockwise", "contiguous", None), ("ring", "zigzag", "mesh2x4")])
def test_causal_by_gradient_through_the_whole_model(kernel, layout, mesh_name, request):
    mesh = request.getfixturevalue(mesh_name) if mesh_name else None
    config = TINY.replace(attention=(kernel,), layout=layout, layers=2)
    t = 19
    g = _causality_grads(config, mesh, t)
    assert np.all(g[t + 1:] == 0), f"position {t} depends on later tokens: {g[t + 1:]}"
    assert np.all(g[: t + 1] > 0), f"position {t} ignores earlier tokens: {g[: t + 1]}"


def test_unknown_kernel_is_rejected_before_tracing():
    with pytest.raises(ValueError, match="unknown attention kernel .flash. in config.model.attention"):
        Transformer(TINY.replace(attention=("flash",)), rngs=nnx.Rngs(0))


def test_non_contiguous_layout_over_shards_needs_positions(mesh2x4):
    model = Transformer(TINY.replace(layout="zigzag"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass positions in layout order"):
        model(jnp.zeros((2, 16), jnp.int32), ctx=ShardingContext(mesh2x4, ACT_RULES))


HYBRID = TINY.replace(attention=("linear", "ring"), layers=2,
                      linear=LinearOptions(feature_map="hedgehog", normalize=True))


def test_hybrid_linear_softmax_stack_matches_across_meshes(mesh2x4, mesh_usp):
    """A hedgehog linear layer (its own decay and feature-map weights) under a ring layer;
    and under usp, its state scan after an all-to-all over ulysses."""
    single = _run(HYBRID, _batch())
    _check(_run(HYBRID.replace(layout="zigzag"), _batch(), mesh2x4), single,
           "linear+ring/zigzag/2x4")
    _check(_run(HYBRID.replace(attention=("linear", "usp"), layout="zigzag"), _batch(),
                mesh_usp), single, "linear+usp/zigzag/2x2x2")


def test_hybrid_trains_on_packed_documents_as_if_each_were_alone(mesh2x4):
    """Packed text through the hybrid: its linear layer's state restarts at each document,
    so the logits of a row's second document equal the model run on that document alone,
    and the zigzag (2, 4) mesh gives what one device gives."""
    batch = _text_batch()
    single = _run(HYBRID, batch)
    _check(_run(HYBRID.replace(layout="zigzag"), batch, mesh2x4), single,
           "linear+ring/zigzag/2x4 with segment ids")
    seg = batch["segment_ids"][0]
    start = int(np.argmax(seg != seg[0]))  # the second document's first token
    end = start + int(np.sum(seg == seg[start]))
    assert 0 < start < end
    alone = {k: v[:1, start:end] for k, v in batch.items() if k != "depth"}
    _close(_run(HYBRID, alone)[0][0], single[0][0, start:end], "second document alone")
