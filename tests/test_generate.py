"""Inference: the decode kernel against float64, the cache sharded in place, `lca.generate`.

Greedy generation must give the tokens of recomputing the whole forward pass and
taking the argmax at each step: by causality that is the argmax of one forward
over prompt + generated tokens, at each position that chose a token.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import TOLERANCE, relative_error
from flax import nnx
from linear_cases import make_inputs
from linear_cases import reference as linear_reference

import lca
from lca import generation
from lca.bench import hlo
from lca.kernels import decode as decode_lib
from lca.models import ModelConfig, Transformer
from lca.parallel import make_mesh
from lca.parallel.linear import attention_in_layout_linear

F32 = TOLERANCE[jnp.float32]
PROMPT, STEPS = 21, 6  # on the meshes: 16 prefilled in parallel, 5 decoded, then 6 generated


def model_for(attention, layout="contiguous", window=0, **changes):
    options = dict(vocab_size=48, embed=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=64,
                   block_q=8, block_k=8)
    cfg = ModelConfig(attention=attention, layout=layout, window=window,
                      **{**options, **changes})
    return Transformer(cfg, rngs=nnx.Rngs(0))


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda state, tokens: nnx.merge(*state)(tokens))


def full_forward(model, tokens):
    """float32 logits [B, T, V] of one forward pass on one device."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(model.config)((graphdef, state), jnp.asarray(tokens)))


def prompt(batch=2, length=PROMPT, seed=0):
    return np.random.default_rng(seed).integers(0, 48, (batch, length)).astype(np.int32)


def check_generation(model, mesh=None, length=PROMPT, steps=STEPS):
    p = prompt(length=length)
    tokens, logits = lca.generate(model, p, steps, mesh=mesh, return_logits=True)
    assert tokens.shape == (2, steps) and tokens.dtype == np.int32
    full = full_forward(model, np.concatenate([p, tokens], axis=1))[:, length - 1:-1]
    np.testing.assert_array_equal(tokens, full.argmax(-1))  # = recompute + argmax each step
    err = relative_error(logits, full)
    assert err <= F32, f"decode logits vs the full forward: relative error {err:.3g} > {F32}"


ONE_DEVICE = [("xla",), ("blockwise",), ("reference",), ("ring",), ("allgather",),
              ("ulysses",), ("usp",), ("linear",), ("linear", "ring")]


@pytest.mark.parametrize("attention", ONE_DEVICE, ids="+".join)
def test_greedy_generation_equals_recomputing_the_forward(attention):
    check_generation(model_for(attention))


def test_greedy_generation_with_a_window_and_tied_embeddings():
    check_generation(model_for(("blockwise",), window=5, tied_embeddings=True))


MESHES = [
    (("ring",), "zigzag", {"data": 2, "sequence": 4}),
    (("linear", "ring"), "zigzag", {"data": 2, "sequence": 4}),
    (("allgather",), "contiguous", {"data": 2, "sequence": 4}),
    (("ulysses",), "striped", {"data": 2, "ulysses": 4}),
    (("usp", "linear"), "zigzag", {"data": 2, "ulysses": 2, "sequence": 2}),
]


@pytest.mark.parametrize("attention,layout,axes", MESHES,
                         ids=["+".join(a) + f"-{lay}" for a, lay, _ in MESHES])
def test_greedy_generation_on_a_mesh_equals_one_device(attention, layout, axes):
    check_generation(model_for(attention, layout), make_mesh(axes))


def test_a_prompt_shorter_than_the_layout_is_decoded_whole(mesh2x4):
    check_generation(model_for(("ring",), "zigzag"), mesh2x4, length=5, steps=3)


def test_prefill_leaves_the_cache_sharded_in_place(mesh2x4):
    """Shard r's slots: its own prompt tokens in layout order, then the ones whose turn it is."""
    model = model_for(("ring",), "zigzag")
    ctx = generation.context(mesh2x4)
    p = prompt(length=16)
    prefill, decode = generation._programs(nnx.graphdef(model), ctx, 16, 32, 2)
    state = generation._on_mesh(nnx.state(model), mesh2x4)
    _, cache = prefill(state, p)
    k = cache.layers[0][0]
    assert k.sharding.spec[:2] == ("data", "sequence")
    for j in range(6):
        _, cache = decode(state, cache, p[:, j])
    slots = np.asarray(cache.positions).reshape(4, 8)
    zigzag = lca.layouts.shard_positions(16, "zigzag", 4)
    np.testing.assert_array_equal(slots[:, :4], zigzag)
    e = decode_lib.EMPTY  # tokens 16..21 went to shards 0, 1, 2, 3, 0, 1
    np.testing.assert_array_equal(slots[:, 4:], [[16, 20, e, e], [17, 21, e, e],
                                                 [18, e, e, e], [19, e, e, e]])
    assert cache.layers[0][0].sharding.spec[:2] == ("data", "sequence")


def _decode_hlo(model, mesh, capacity):
    ctx = generation.context(mesh)
    prefill, decode = generation._programs(nnx.graphdef(model), ctx, 16, capacity, 2)
    state = generation._on_mesh(nnx.state(model), mesh)
    _, cache = prefill(state, prompt(length=16))
    return decode.lower(state, cache, jnp.zeros((2,), jnp.int32)).compile().as_text()


def test_compiled_decode_step_moves_the_same_bytes_whatever_the_capacity(mesh8):
    """No all-gather of the cache; per softmax layer one all-reduce max and one all-reduce
    sum of [B, H, D + 1] floats, so the bytes sent do not grow with the cache."""
    model = model_for(("ring",), "zigzag")
    texts = [_decode_hlo(model, mesh8, c) for c in (64, 512)]
    for text in texts:
        ops = [op for comp in hlo.parse(text)[0].values() for _, _, op, _ in comp]
        assert "all-gather" not in ops and "all-to-all" not in ops
        assert "collective-permute" not in ops
        assert ops.count("all-reduce") == 2 * model.config.layers
    sent = [hlo.sent_bytes(t) for t in texts]
    assert sent[0] == sent[1] > 0
    per_layer = 2 * 4 * 4 * (8 + 1) + 2 * 4 * 4  # psum [B, H, D + 1] and pmax [B, H], float32
    assert sent[0] == 2 * 7 / 8 * per_layer * model.config.layers


def test_decode_kernel_reads_only_used_tiles_and_matches_float64():
    """attend_slice against the dense float64 oracle, grouped heads and a window; unused
    slots hold NaN, so a tile read beyond the used ones would poison the output."""
    rng = np.random.default_rng(1)
    b, s, h, kh, d, used = 2, 64, 4, 2, 8, 37
    q = rng.standard_normal((b, 2, h, d)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, d)).astype(np.float32)
    pos = np.full((s,), decode_lib.EMPTY, np.int32)
    pos[:used] = rng.permutation(used)  # any order: masks go by position
    q_pos = np.array([used - 1, used - 5], np.int32)
    k[:, 48:], v[:, 48:] = np.nan, np.nan  # tiles of 16: the fourth one is never read
    for window in (None, 9):
        out, lse = jax.jit(functools.partial(decode_lib.attend_slice, window=window, block=16))(
            q, k, v, pos, q_pos, jnp.int32(used))
        ref, ref_lse = lca.attention(
            *(x.astype(np.float64) for x in (q, k[:, :used], v[:, :used])), impl="reference",
            causal=True, window=window, positions=q_pos, kv_positions=pos[:used],
            return_lse=True)
        assert relative_error(out, ref) <= F32 and relative_error(lse, ref_lse) <= F32


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("algorithm", ["allgather", "ring", "doubling"])
def test_sequence_parallel_linear_returns_the_final_state(mesh8, layout, algorithm):
    x = make_inputs(3, batch=2, length=32, heads=4, decay="head", normalize=True)
    f64 = {n: None if a is None else a.astype(jnp.float64) for n, a in x.items()}
    _, ref_state = linear_reference(f64["q"], f64["k"], f64["v"], f64["log_decay"],
                                    normalize=True)
    perm = lambda a: lca.layouts.permute(a, layout, 8, axis=1)
    _, state = jax.jit(lambda q, k, v, g: attention_in_layout_linear(
        q, k, v, mesh=mesh8, layout=layout, algorithm=algorithm, log_decay=g,
        normalize=True, chunk_size=4, return_state=True))(
            perm(x["q"]), perm(x["k"]), perm(x["v"]), x["log_decay"])
    assert relative_error(state, ref_state) <= F32


def test_bad_arguments_name_both_sides(mesh2x4):
    model = model_for(("ring",), "zigzag")
    p = prompt()
    cases = [
        (dict(capacity=PROMPT + STEPS - 1), f"{PROMPT} + steps {STEPS} = {PROMPT + STEPS}"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be None or an int in 1 .. 48"),
        (dict(temperature=0.5), "pass rng=jax.random.key"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message.replace("+", r"\+").replace(".", r"\.")):
            lca.generate(model, p, STEPS, **options)
    with pytest.raises(ValueError, match="the prompt is empty"):
        lca.generate(model, p[:, :0], STEPS)
    with pytest.raises(ValueError, match=r"in \[0, 48\)"):
        lca.generate(model, p + 48, STEPS)
    with pytest.raises(ValueError, match="nearest valid lengths"):
        model.prefill(p, capacity=32, ctx=generation.context(mesh2x4))
    _, cache = model.prefill(p, capacity=32)
    with pytest.raises(ValueError, match="layers: cache 2 vs model 3"):
        model_for(("ring",), "zigzag", layers=3).decode(cache, p[:, 0])
    with pytest.raises(ValueError, match=r"shape \(2,\); got shape \(2, 1\)"):
        model.decode(cache, p[:, :1])
    with pytest.raises(ValueError, match=r"sharded for one device, but decode runs on mesh"):
        model.decode(cache, p[:, 0], ctx=generation.context(mesh2x4))


def test_sampling_follows_the_key_and_top_k():
    model = model_for(("blockwise",))
    p = prompt()
    one = lca.generate(model, p, 8, temperature=1.0, rng=jax.random.key(3))
    again = lca.generate(model, p, 8, temperature=1.0, rng=jax.random.key(3))
    other = lca.generate(model, p, 8, temperature=1.0, rng=jax.random.key(4))
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)
    top1 = lca.generate(model, p, 8, temperature=1.0, top_k=1, rng=jax.random.key(3))
    np.testing.assert_array_equal(top1, lca.generate(model, p, 8))  # top-1 is greedy


def test_the_all_gathered_cache_baseline_gives_the_same_logits(mesh2x4):
    """The benchmarks' baseline decodes the same: it only moves more."""
    model = model_for(("ring",), "zigzag")
    ctx = generation.context(mesh2x4)
    state = generation._on_mesh(nnx.state(model), mesh2x4)
    graphdef = nnx.graphdef(model)
    p = prompt(length=16)
    step = lambda gather: jax.jit(lambda s, c, t: nnx.merge(graphdef, s).decode(
        c, t, ctx=ctx, gather_cache=gather))
    _, cache = jax.jit(lambda s, t: nnx.merge(graphdef, s).prefill(t, capacity=32, ctx=ctx))(
        state, p)
    merged, gathered = step(False), step(True)
    a, b = merged(state, cache, p[:, 0])[0], gathered(state, cache, p[:, 0])[0]
    assert relative_error(b, a) <= F32
    texts = [f.lower(state, cache, p[:, 0]).compile().as_text() for f in (merged, gathered)]
    assert "all-gather" in texts[1] and "all-gather" not in texts[0]
