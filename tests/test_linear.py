"""Causal linear attention on one device: every impl against the float64 recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lca
from attention_cases import relative_error
from linear_cases import (DECAYS, assert_close, jit, make_inputs, outputs_and_grads,
                          reference, reference_results)

# Length 75: not a multiple of any chunk size below. With chunk_size 4 the
# chunked impl takes 19 chunks in two scan steps (with padding); with 16, five
# chunks in one step, the last one partial.
CHUNK = {"none": 4, "head": 16, "token": 4}


attend = jit(lca.linear_attention,
             static_argnames=("normalize", "chunk_size", "return_state", "impl"))


def _kernel(impl, normalize, chunk_size=16, segment_ids=None):
    def fn(q, k, v, log_decay, initial_state):
        return lca.linear_attention(q, k, v, log_decay=log_decay, normalize=normalize,
                                    chunk_size=chunk_size, initial_state=initial_state,
                                    return_state=True, impl=impl, segment_ids=segment_ids)
    return fn


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("impl", ["chunked", "recurrent", "quadratic"])
def test_matches_float64_recurrence_outputs_state_and_gradients(impl, decay, normalize):
    inputs = make_inputs(0, decay=decay, normalize=normalize)
    got = outputs_and_grads(_kernel(impl, normalize, CHUNK[decay]), inputs)
    assert_close(got, reference_results(0, decay, normalize), jnp.float32,
                 f"{impl}/{decay}/normalize={normalize}")


# Packed documents with grouped-query heads (4 query heads on 2 kv heads): each impl,
# decay off and on, 6 documents per row at random boundaries, crossing the 4-token chunks
# of the chunked impl's two scan steps; the initial state flows into the first document.
PACKED = [("chunked", "token", True), ("chunked", "none", False),
          ("recurrent", "head", True), ("quadratic", "token", False)]


@pytest.mark.parametrize("impl, decay, normalize", PACKED)
def test_packed_documents_and_grouped_heads_match_the_recurrence_with_resets(impl, decay,
                                                                            normalize):
    shape = dict(heads=4, kv_heads=2, documents=6)
    inputs = make_inputs(3, decay=decay, normalize=normalize, **shape)
    got = outputs_and_grads(_kernel(impl, normalize, 4, inputs["segment_ids"]), inputs)
    ref = reference_results(3, decay, normalize, **shape)
    assert_close(got, ref, jnp.float32, f"packed {impl}/{decay}/normalize={normalize}")
    # The resets matter: one document throughout is a different answer.
    one = reference_results(3, decay, normalize, heads=4, kv_heads=2)
    assert relative_error(got[0], one[0]) > 0.1


def test_bfloat16_inputs_give_bfloat16_outputs_and_float32_state():
    inputs = make_inputs(0, decay="token", normalize=True, dtype=jnp.bfloat16)
    got = outputs_and_grads(_kernel("chunked", True, 4), inputs)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert_close(got, reference_results(0, "token", True), jnp.bfloat16, "bfloat16")


def test_default_chunk_and_no_initial_state():
    x = make_inputs(1, length=150, decay="head")
    out = attend(x["q"], x["k"], x["v"], log_decay=x["log_decay"])
    f64 = lambda a: a.astype(jnp.float64)
    ref, _ = reference(f64(x["q"]), f64(x["k"]), f64(x["v"]), f64(x["log_decay"]))
    assert out.shape == x["v"].shape and out.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(out - ref).max() / np.abs(ref).max(), 2e-5)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_prefill_then_decoding_steps_reproduce_the_full_forward(normalize):
    x = make_inputs(2, length=40, decay="token", normalize=normalize)
    q, k, v, g = x["q"], x["k"], x["v"], x["log_decay"]
    full, full_state = attend(q, k, v, log_decay=g, normalize=normalize, chunk_size=8,
                              initial_state=x["initial_state"], return_state=True)
    prefill = 13
    out, state = attend(q[:, :prefill], k[:, :prefill], v[:, :prefill], log_decay=g[:, :prefill],
                        normalize=normalize, chunk_size=8, initial_state=x["initial_state"],
                        return_state=True)
    step = jit(lambda s, q, k, v, g: lca.linear_attention_step(
        s, q, k, v, log_decay=g, normalize=normalize))
    outs = [out]
    for t in range(prefill, q.shape[1]):
        o_t, state = step(state, q[:, t], k[:, t], v[:, t], g[:, t])
        outs.append(o_t[:, None])
    decoded = jnp.concatenate(outs, axis=1)
    scale = np.abs(full).max()
    assert np.abs(decoded - full).max() <= 2e-5 * scale
    assert np.abs(state - full_state).max() <= 2e-5 * np.abs(full_state).max()


def test_step_with_a_constant_decay_per_head():
    x = make_inputs(3, length=6, decay="head")
    state = x["initial_state"]
    step = jit(lca.linear_attention_step)
    for t in range(6):
        o_t, state = step(state, x["q"][:, t], x["k"][:, t], x["v"][:, t],
                          log_decay=x["log_decay"])
    out, final = attend(x["q"], x["k"], x["v"], log_decay=x["log_decay"],
                        initial_state=x["initial_state"], return_state=True)
    np.testing.assert_allclose(o_t, out[:, -1], rtol=0, atol=2e-5 * np.abs(out).max())
    np.testing.assert_allclose(state, final, rtol=0, atol=2e-5 * np.abs(final).max())


def test_strong_decay_over_4096_tokens_is_finite_and_exact():
    """g = -50 per token: a naive exp(G_t) / exp(G_s) form overflows after two tokens."""
    b, t, h, d = 1, 4096, 2, 4
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    g = jnp.full((b, t, h), -50.0, jnp.float32)

    def loss(q, k, v, g):
        out, state = lca.linear_attention(q, k, v, log_decay=g, return_state=True)
        return out.sum() + state.sum(), out

    (_, out), grads = jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, g)
    for x in (out, *grads):
        assert np.all(np.isfinite(np.asarray(x)))
    # Only the token itself survives the decay: o_t = (q_t · k_t) v_t.
    expected = (q * k).sum(-1, keepdims=True) * v
    assert np.abs(out - expected).max() <= 2e-5 * np.abs(expected).max()


def test_chunked_forward_backward_needs_less_than_one_more_input_of_memory():
    """Compiled temporaries at 32k tokens stay under one [T, H, D] float32 buffer.

    No [T, T] block (512x that), no per-chunk residuals, and no copy of the
    inputs into the scan: each step slices them by index.
    """
    t, h, d = 32768, 4, 64
    x = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)
    g = jax.ShapeDtypeStruct((1, t, h), jnp.float32)
    loss = lambda q, k, v, g: lca.linear_attention(q, k, v, log_decay=g).sum()
    compiled = jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, x, g).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    one_input = t * h * d * 4
    assert temp <= one_input, f"{temp} B of temporaries; one [T, H, D] input is {one_input} B"


def test_feature_maps_give_the_kernels_they_promise():
    rng = np.random.default_rng(5)
    q, k = (jnp.asarray(rng.standard_normal((2, 7, 3, 4)), jnp.float32) for _ in range(2))
    maps = jit(lambda q, k: (lca.kernels.taylor2(q), lca.kernels.taylor2(k),
                                 lca.kernels.elu1(q), lca.kernels.relu(q)))
    tq, tk, elu1, relu = maps(q, k)
    s = (q * k).sum(-1) / 2.0  # scale = head_dim ** -0.5 = 1/2
    np.testing.assert_allclose((tq * tk).sum(-1), 1 + s + s**2 / 2, rtol=1e-5)
    assert tq.shape == (2, 7, 3, 1 + 4 + 16)
    assert np.all(elu1 > 0) and np.all(relu >= 0)
    np.testing.assert_array_equal(relu, np.maximum(q, 0))


def test_hedgehog_is_positive_normalised_and_learnable():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)
    weight, bias = lca.kernels.hedgehog_identity(3, 4)
    ct = jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32)

    def loss(weight, bias):
        phi = lca.kernels.hedgehog(x, weight, bias)
        return (phi * ct).sum(), phi

    (_, phi), (dw, db) = jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(weight, bias)
    assert phi.shape == (2, 5, 3, 8) and np.all(phi > 0)
    np.testing.assert_allclose(phi.sum(-1), 1, rtol=1e-6)
    # At the identity map the features are softmax([x, -x]).
    np.testing.assert_allclose(phi, jax.nn.softmax(jnp.concatenate([x, -x], -1)), rtol=1e-6)
    assert dw.shape == weight.shape and db.shape == bias.shape
    assert np.abs(dw).max() > 0 and np.abs(db).max() > 0
