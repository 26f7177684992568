"""Passkey retrieval with ring attention in the zigzag layout: the default main job.

    make run
    # = python experiments/train.py --config configs/passkey.py --workdir out/passkey

A 2-layer model (embed 64, 2 heads of 32, 1 KV head, SwiGLU 256) learns to
find a 4-digit key hidden at a random depth in 1024 tokens of repeated filler,
on a (data=2, sequence=4) mesh of 8 emulated CPU devices. The haystack grows
64 -> 128 -> 256 -> 512 -> 1024 tokens over the 600 steps (`data.curriculum`):
a needle is found much sooner in a short haystack, and the skill carries over.
Expect: held-out `accuracy` (all 4 digits right) >= 0.9 at 1024 tokens at
every depth, in about 5 minutes on a 2-core machine.

Variants: `:smoke` (seconds, for tests); any kernel of `lca.kernels.registry`
(`:blockwise`, `:xla`, `:allgather`, `:ulysses`, `:usp`, ...: same model, another
kernel, the mesh fitted to it: `:usp` runs on (data=2, ulysses=2, sequence=2),
all-to-all over `ulysses` and the ring over `sequence`; `:ulysses` on
(data=4, sequence=2), as the model's 2 heads split over at most 2 devices).
`python experiments/train.py --config configs/passkey.py:smoke,usp --workdir
/tmp/usp` trains the smoke model with USP; expect its loss to fall as the
ring's does.
"""

import ml_collections

from lca.train.config_files import set_kernel, unknown_variant

PARAM_RULES = (("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"),
               ("kv_heads", "tensor"), ("mlp", "tensor"))
# length: the ring axis first, then the all-to-all axis a two-axis strategy (usp) also uses.
ACTIVATION_RULES = (("batch", ("data", "fsdp")), ("length", ("sequence", "ulysses")),
                    ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
                    ("vocab", "tensor"))


def base_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.cpu_devices = 8  # emulated CPU devices (ignored when JAX already started)
    c.mesh = ml_collections.ConfigDict({"data": 2, "sequence": 4})
    c.dcn = {}  # axes split over TPU slices, {axis: slices}; e.g. {"data": 2} (docs/multihost.md)
    c.sharding = ml_collections.ConfigDict()
    c.sharding.params = PARAM_RULES
    c.sharding.activations = ACTIVATION_RULES
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=128, embed=64, layers=2, heads=2, kv_heads=1, head_dim=32, mlp=256,
        attention="ring", local="blockwise", layout="zigzag", window=0, block_q=128,
        block_k=128,
        tied_embeddings=False, rope_base=10000.0, norm_eps=1e-6, remat=False, dtype="float32",
        linear=ml_collections.ConfigDict(dict(
            feature_map="elu1", decay=True, normalize=False, chunk_size=64, hedgehog_dim=0)),
        sparse=ml_collections.ConfigDict(dict(
            num_buckets=4, keep=0.5, capacity_factor=1.25, block=64, sample_size=64,
            min_seq_len=0))))
    c.data = ml_collections.ConfigDict(dict(
        task="passkey", seq_len=1024, vocab_size=128, key_len=4, num_pairs=16, num_queries=8,
        validation_percent=5, max_bytes=0,
        curriculum=((64, 200), (128, 100), (256, 100), (512, 100))))
    c.train = ml_collections.ConfigDict(dict(
        steps=600, batch_size=16, learning_rate=3e-3, warmup_steps=50,
        end_learning_rate_fraction=0.1, weight_decay=0.01, b1=0.9, b2=0.95, clip_norm=1.0,
        log_every=20, eval_every=200, checkpoint_every=200, keep_checkpoints=2,
        on_nonfinite="stop"))  # or "skip": a non-finite loss/gradient skips the update
    c.eval = ml_collections.ConfigDict(dict(batch_size=32, batches=4, lengths=(256, 512, 1024),
                                            depth_bins=10))
    return c


def smoke(c):
    """Seconds: a tiny model, short sequences, a few steps."""
    c.model.embed, c.model.mlp, c.model.block_q, c.model.block_k = 32, 64, 16, 16
    c.data.seq_len = 64
    c.data.curriculum = ()
    c.train.update(steps=8, batch_size=8, log_every=2, eval_every=0, checkpoint_every=4,
                   warmup_steps=2, learning_rate=1e-2)
    c.eval.update(batch_size=4, batches=1, lengths=(64,), depth_bins=4)
    return c


def get_config(arg=""):
    c = base_config()
    for variant in filter(None, (arg or "").split(",")):
        if variant == "smoke":
            smoke(c)
        elif not set_kernel(c, variant):
            raise unknown_variant(__file__, variant, ("smoke",))
    return c
