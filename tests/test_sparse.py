"""Bucketed and dropped attention against the float64 reference with the equivalent mask.

The reference runs each query head alone with the mask written out: segment
ids = buckets (documents x buckets with packed documents); dropped queries
and keys get segment ids that meet nothing, and dropped queries' outputs are
zeros. Outputs and q/k/v gradients, at the fixed float32 tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import TOLERANCE, relative_error
from flax import nnx

import lca
from lca import sparse
from lca.models import SparseOptions, Transformer
from lca.models.sparse import Fixed

F32 = TOLERANCE[jnp.float32]
B, T, H, KH, D = 2, 45, 4, 2, 8  # 45: no multiple of the 8- or 16-token tiles
G = H // KH


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    k = rng.standard_normal((B, T, KH, D)).astype(np.float32)
    v = rng.standard_normal((B, T, KH, D)).astype(np.float32)
    ct = rng.standard_normal((B, T, H, D)).astype(np.float32)
    return q, k, v, ct


def with_grads(fn, q, k, v, ct):
    loss = lambda q, k, v: (fn(q, k, v).astype(ct.dtype) * ct).sum()
    out = jax.jit(fn)(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def reference(q_seg, k_seg, q_zero=None):
    """Per query head h: float64 reference attention with segment ids q_seg[..., h] against
    kv head h // G's k_seg; rows in q_zero (bool [B, T, H]) output zeros."""
    def fn(q, k, v):
        outs = []
        for h in range(H):
            j = h // G
            o = lca.attention(q[:, :, h:h + 1], k[:, :, j:j + 1], v[:, :, j:j + 1],
                              impl="reference", causal=True, segment_ids=q_seg[..., h],
                              kv_segment_ids=k_seg[..., j])
            outs.append(o if q_zero is None else jnp.where(q_zero[..., h:h + 1, None], 0, o))
        return jnp.concatenate(outs, axis=2)
    return fn


def assert_close(got, ref, what):
    for name, g, r in zip(("out", "dq", "dk", "dv"), (got[0], *got[1]), (ref[0], *ref[1])):
        err = relative_error(g, r)
        assert err <= F32, f"{what} {name}: relative error {err:.3g} > {F32}"


def f64(*xs):
    return [x.astype(np.float64) for x in xs]


DOCS = np.repeat(np.arange(3), [11, 25, 9])[None].repeat(B, 0).astype(np.int32)


@pytest.mark.parametrize("buckets,docs,aligned", [(1, False, False), (4, False, False),
                                                  (4, False, True), (8, False, True),
                                                  (4, True, False), (8, True, False)])
def test_bucketed_equals_the_reference_with_buckets_as_segments(buckets, docs, aligned):
    q, k, v, ct = inputs()
    qb = np.asarray(sparse.hash_buckets(q, buckets, jax.random.key(0)))
    kb = np.asarray(sparse.hash_buckets(k, buckets, jax.random.key(0)))
    if buckets == 8:  # an empty bucket: nobody in bucket 3
        qb, kb = np.where(qb == 3, 2, qb), np.where(kb == 3, 2, kb)
    seg = DOCS if docs else None
    got = with_grads(lambda q, k, v: sparse.bucketed_attention(
        q, k, v, qb, kb, segment_ids=seg, block_q=8, block_k=16,
        num_buckets=buckets if aligned else None), q, k, v, ct)
    q_seg = qb + (100 * DOCS[..., None] if docs else 0)
    k_seg = kb + (100 * DOCS[..., None] if docs else 0)
    assert_close(got, with_grads(reference(q_seg, k_seg), *f64(q, k, v, ct)),
                 f"{buckets} buckets")


def test_buckets_that_cross_tiles_are_skipped_only_where_they_cannot_meet():
    """Sorted by bucket, most tile pairs hold no common bucket: the kernel's tile classes
    (from the permuted positions and segment ids) skip them, and the result stays exact."""
    from lca.kernels import masks  # noqa: PLC0415

    q, k, v, ct = inputs(1)
    qb = np.asarray(sparse.hash_buckets(q, 4, jax.random.key(2)))[:1, :, :1]
    order = np.argsort(qb[0, :, 0], kind="stable")
    pos = order[None].astype(np.int32)
    seg = qb[0, order, 0][None]
    arrays = masks.make_mask_arrays(1, T, T, positions=pos, kv_positions=pos, segment_ids=seg)
    kinds = np.asarray(masks.classify_tiles(masks.MaskSpec(True, None, True), arrays, 8, 8))
    dense = np.asarray(masks.classify_tiles(masks.MaskSpec(True), masks.make_mask_arrays(
        1, T, T), 8, 8))
    assert (kinds == masks.SKIP).sum() > (dense == masks.SKIP).sum()


@pytest.mark.parametrize("docs", [False, True])
def test_dropped_equals_the_reference_with_dropped_tokens_masked(docs):
    q, k, v, ct = inputs(2)
    rng = np.random.default_rng(3)
    q_keep, k_keep = rng.uniform(size=(B, T, H)) < 0.5, rng.uniform(size=(B, T, KH)) < 0.4
    cap = int(max(q_keep.sum(1).max(), k_keep.sum(1).max()))
    seg = DOCS if docs else None
    got = with_grads(lambda q, k, v: sparse.dropped_attention(
        q, k, v, q_keep, k_keep, capacity=cap, segment_ids=seg, block_q=8, block_k=8),
        q, k, v, ct)
    doc = DOCS[..., None] if docs else 0
    q_seg = np.where(q_keep, doc, -1)
    k_seg = np.where(k_keep, doc, -2)
    ref = with_grads(reference(q_seg, k_seg, q_zero=~q_keep), *f64(q, k, v, ct))
    assert_close(got, ref, "dropped")
    dq = np.asarray(got[1][0])
    assert np.all(dq[~q_keep] == 0)  # a dropped query gets no gradient


def test_traced_keep_masks_over_capacity_attend_the_first_kept_tokens():
    q, k, v, ct = inputs(4)
    q_keep = np.ones((B, T, H), bool)
    k_keep = np.ones((B, T, KH), bool)
    cap = 20
    with pytest.raises(ValueError, match="keeps up to 45 tokens of a head, over the capacity 20"):
        sparse.dropped_attention(q, k, v, q_keep, k_keep, capacity=cap)
    out = jax.jit(lambda q, k, v, qk, kk: sparse.dropped_attention(
        q, k, v, qk, kk, capacity=cap))(q, k, v, q_keep, k_keep)
    first = np.arange(T) < cap  # under tracing: the first 20 kept of each head count
    per_head = lambda x, n: np.broadcast_to(x[None, :, None], (B, T, n))
    ref = reference(per_head(np.where(first, 0, -1), H), per_head(np.where(first, 0, -2), KH),
                    q_zero=per_head(~first, H))
    assert relative_error(out, ref(*f64(q, k, v))) <= F32


def test_bad_arguments_name_the_argument():
    q, k, v, _ = inputs()
    ok_b = np.zeros((B, T, H), np.int32)
    ok_kb = np.zeros((B, T, KH), np.int32)
    keep_q, keep_k = np.ones((B, T, H), bool), np.ones((B, T, KH), bool)
    cases = [
        (lambda: sparse.bucketed_attention(q, k, v, ok_b.astype(np.float32), ok_kb),
         "q_buckets must be an integer array"),
        (lambda: sparse.bucketed_attention(q, k, v, ok_b[:, :3], ok_kb), "q_buckets must have shape"),
        (lambda: sparse.bucketed_attention(q, k, v, ok_b, ok_b),
         r"k_buckets of shape \(2, 45, 4\) has one id per query head"),
        (lambda: sparse.hash_buckets(q, 0, jax.random.key(0)), "num_buckets must be an integer >= 1"),
        (lambda: sparse.dropped_attention(q, k, v, keep_q.astype(int), keep_k, capacity=4),
         "q_keep must be a bool array"),
        (lambda: sparse.dropped_attention(q, k, v, keep_q, keep_k[:, :2], capacity=4),
         "k_keep must have shape"),
        (lambda: sparse.dropped_attention(q, k, v, keep_q, keep_k, capacity=0),
         r"capacity must be an int in 1 \.\. 45"),
        (lambda: sparse.dropped_attention(q, k, v, keep_q, keep_k, capacity=46),
         r"capacity must be an int in 1 \.\. 45"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("kernel", ["hash_sparse", "qk_drop", "hyper"])
def test_a_sparse_layer_is_causal_and_trains_in_the_model(kernel):
    """No logit depends on a later token (the bucket and keep decisions are per token); the
    loss and its gradients are finite; the fixed projections are state, not parameters."""
    from test_model import TINY, _batch, _causality_grads, _run  # noqa: PLC0415

    config = TINY.replace(attention=(kernel,), layers=2, sparse=SparseOptions(
        block=4, sample_size=4, min_seq_len=8))  # hyper: the recursion runs at 32 tokens
    g = _causality_grads(config, None, 19)
    assert np.all(g[20:] == 0), f"position 19 depends on later tokens: {g[20:]}"
    assert g[19] > 0
    _, loss, grads = _run(config, _batch())
    assert np.isfinite(loss) and all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
    model = Transformer(config, rngs=nnx.Rngs(0))
    fixed = jax.tree.leaves(nnx.state(model, Fixed))  # projections, or hyper's seed
    params = {id(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert fixed and not any(id(x) in params for x in fixed)
