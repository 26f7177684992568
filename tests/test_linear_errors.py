"""Bad input to linear attention raises a ValueError naming the argument, before tracing."""

import jax
import jax.numpy as jnp
import pytest

import lca
from lca.parallel import make_mesh
from lca.parallel.linear import attention_in_layout_linear

Q = jnp.zeros((2, 16, 4, 8))
V = jnp.zeros((2, 16, 4, 6))
STATE = jnp.zeros((2, 4, 8, 6))


@pytest.mark.parametrize("impl", ["chunked", "recurrent", "quadratic"])
@pytest.mark.parametrize("args, kwargs, message", [
    ((Q[0], Q, V), {}, r"q must be \[batch, seq, heads, key_dim\] \(rank 4\)"),
    ((Q, Q[..., 0], V), {}, r"k must be \[batch, seq, kv_heads, key_dim\]"),
    ((Q, Q, V[0]), {}, r"v must be \[batch, seq, kv_heads, value_dim\]"),
    ((Q.astype(jnp.int32), Q, V), {}, "q must be a floating dtype"),
    ((Q, Q[..., :4], V), {}, r"k must be .* with q's batch, seq \(2, 16\) and key_dim 8"),
    ((Q, Q, V[:, :8]), {}, "v must be .* with k's leading dims"),
    ((Q, Q[:, :, :3], V[:, :, :3]), {}, r"heads \(4\) must be a multiple of kv_heads \(3\)"),
    ((Q, Q, V), {"log_decay": jnp.zeros(3)}, r"log_decay must have shape \[heads\] = \(4,\)"),
    ((Q, Q, V), {"log_decay": jnp.zeros((2, 16))}, r"\[batch, seq, heads\] = \(2, 16, 4\)"),
    ((Q, Q, V), {"log_decay": jnp.full(4, 0.1)}, "log_decay must be <= 0 everywhere"),
    ((Q, Q, V), {"log_decay": jnp.full((2, 16, 4), jnp.nan)}, "log_decay must be <= 0"),
    ((Q, Q, V), {"log_decay": jnp.zeros(4, jnp.int32)}, "log_decay must be a floating dtype"),
    ((Q, Q, V), {"chunk_size": 0}, "chunk_size must be a positive integer"),
    ((Q, Q, V), {"chunk_size": 8.0}, "chunk_size must be a positive integer"),
    ((Q, Q, V), {"initial_state": STATE[..., :5]},
     r"initial_state must have shape \[batch, heads, key_dim, value_dim\] = \(2, 4, 8, 6\)"),
    ((Q, Q, V), {"initial_state": STATE, "normalize": True},
     r"initial_state must have shape .*value_dim \+ 1\] = \(2, 4, 8, 7\)"),
    ((Q, Q, V), {"normalize": "yes"}, "normalize must be a bool"),
    ((Q, Q, V), {"segment_ids": jnp.zeros((2, 15), jnp.int32)},
     r"segment_ids must be \[batch, seq\] = \(2, 16\)"),
    ((Q, Q, V), {"segment_ids": jnp.zeros((2, 16, 4), jnp.int32)}, "segment_ids must be"),
    ((Q, Q, V), {"segment_ids": jnp.zeros((2, 16))}, "segment_ids must be an integer dtype"),
])
def test_bad_arguments_are_named(impl, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lca.linear_attention(*args, impl=impl, **kwargs)


def test_unknown_impl_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"impl must be one of \['chunked', 'recurrent',"
                                         r" 'quadratic'\]; got 'flash'"):
        lca.linear_attention(Q, Q, V, impl="flash")


def test_checks_run_before_tracing():
    with pytest.raises(ValueError, match="chunk_size"):
        jax.jit(lambda q: lca.linear_attention(q, q, q, chunk_size=-1)).lower(Q)


@pytest.mark.parametrize("args, kwargs, message", [
    ((STATE, Q[:, 0], Q[:, 0, :, :4], V[:, 0]), {}, "k_t must be .* with q_t's batch"),
    ((STATE, Q[:, 0], Q[:, 0], V[:1, 0]), {}, "v_t must be .* with k_t's leading dims"),
    ((STATE, Q[:, :, 0, 0], Q[:, 0], V[:, 0]), {}, r"q_t must be \[batch, heads, key_dim\]"),
    ((STATE[0], Q[:, 0], Q[:, 0], V[:, 0]), {}, "state must be"),
    ((STATE, Q[:, 0], Q[:, 0], V[:, 0]), {"normalize": True},
     r"state must have shape \(2, 4, 8, 7\) \(normalize=True adds the key-sum column\)"),
    ((STATE, Q[:, 0], Q[:, 0], V[:, 0]), {"log_decay": jnp.zeros(5)}, "log_decay must have shape"),
    ((STATE, Q[:, 0], Q[:, 0], V[:, 0]), {"log_decay": jnp.ones((2, 4))}, "log_decay must be <= 0"),
])
def test_bad_step_arguments_are_named(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lca.linear_attention_step(*args, **kwargs)


def test_hedgehog_weight_must_match_the_head_dim():
    with pytest.raises(ValueError, match="weight must be"):
        lca.kernels.hedgehog(Q, jnp.zeros((4, 6, 3)))
    with pytest.raises(ValueError, match="bias must be"):
        lca.kernels.hedgehog(Q, jnp.zeros((4, 8, 3)), jnp.zeros((4, 4)))


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "striped"}, "layout='striped' is not supported by linear attention"),
    ({"layout": "diagonal"}, r"layout must be one of \['contiguous', 'zigzag'\]"),
    ({"algorithm": "tree"}, r"algorithm must be one of \['ring', 'allgather', 'doubling'\]"),
    ({"axis": "model"}, "axis 'model' is not a mesh axis"),
    ({"window": 4}, r"linear attention does not take \['window'\]"),
    ({"causal": False}, "linear attention is causal only"),
    ({"log_decay": jnp.ones(4)}, "log_decay must be <= 0"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ({"segment_ids": jnp.zeros((2, 32), jnp.float32)}, "segment_ids must be an integer dtype"),
])
def test_bad_parallel_arguments_are_named(mesh8, kwargs, message):
    q = jnp.zeros((2, 32, 4, 8))
    with pytest.raises(ValueError, match=message):
        attention_in_layout_linear(q, q, q, mesh=mesh8, **kwargs)


def test_sequence_length_must_split_into_the_layout_pieces(mesh8):
    q = jnp.zeros((2, 24, 4, 8))
    with pytest.raises(ValueError, match=r"seq length 24 must divide into 16 equal pieces"):
        attention_in_layout_linear(q, q, q, mesh=mesh8, layout="zigzag")


def test_doubling_needs_a_power_of_two_axis():
    mesh6 = make_mesh({"sequence": 6}, devices=jax.devices()[:6])
    q = jnp.zeros((1, 12, 2, 4))
    with pytest.raises(ValueError, match="algorithm='doubling' needs a power-of-two size"):
        attention_in_layout_linear(q, q, q, mesh=mesh6, algorithm="doubling")


def test_query_and_kv_heads_must_split_over_the_same_axes(mesh2x2x2):
    q, kv = jnp.zeros((2, 8, 6, 4)), jnp.zeros((2, 8, 3, 4))
    with pytest.raises(ValueError, match=r"kv_heads 3 does not divide by the mesh axes"
                                         r" \['tensor'\] of size 2 that split the 6 query heads"):
        attention_in_layout_linear(q, kv, kv, mesh=mesh2x2x2)
