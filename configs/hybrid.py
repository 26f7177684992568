"""A hybrid stack: three linear-attention layers per softmax (ring) layer, on recall.

    python experiments/train.py --config configs/hybrid.py --workdir out/hybrid

Multi-query associative recall (16 key-value pairs, 8 queries, 512 tokens):
the task linear attention alone is known to find hard and one exact softmax
layer per group repairs. Layers cycle "linear,linear,linear,ring" (one config
line); linear layers use the elu+1 feature map with a learned per-head
decay, and pass their state across the `sequence` axis. Mesh (data=2,
sequence=2, tensor=2): heads and the MLP are split over `tensor`. The
haystack grows 64 -> 512 tokens over the 600 steps, as in configs/passkey.py.
Expect held-out recall accuracy at 512 tokens of about 0.10 after the default
600 steps, six times chance (1/63) and still climbing, in about 10 minutes on
a 2-core machine; train longer (--config.train.steps) for more.

Variants: `:smoke` (seconds, for tests), `:softmax` (every layer ring),
`:text` (packed documents: configs/text.py's data, model, mesh and schedule
with layers "linear,ring"; the linear layer's state restarts at each document
boundary, as the ring layer's segment ids keep documents apart):

    python experiments/train.py --config configs/hybrid.py:text --workdir out/hybrid_text

Expect validation bits per byte of about 3.25 after its 300 steps (text.py's
all-ring model: 3.19; two linear layers: 4.05), in about 2 minutes on a 2-core
machine. `:text,smoke` is its seconds-long test run.
"""

from lca.train.config_files import sibling


def get_config(arg=""):
    variants = [v for v in (arg or "").split(",") if v]
    c = sibling(__file__, "passkey").base_config()
    c.mesh = {"data": 2, "sequence": 2, "tensor": 2}
    c.model.update(vocab_size=128, embed=64, layers=4, heads=4, kv_heads=2, head_dim=16,
                   mlp=256, attention="linear,linear,linear,ring", layout="zigzag")
    c.model.linear.update(feature_map="elu1", decay=True, normalize=True, chunk_size=64)
    c.data.update(task="recall", seq_len=512, vocab_size=128, num_pairs=16, num_queries=8)
    c.train.update(steps=600, batch_size=16, learning_rate=3e-3)
    c.eval.update(batch_size=16, batches=4, lengths=(512,), depth_bins=4)
    if "text" in variants:  # text.py's run, one linear layer under the ring layer
        rest = [v for v in variants if v != "text"]
        if rest not in ([], ["smoke"]):
            raise ValueError(f"configs/hybrid.py: variant 'text' takes only 'smoke'; got {rest}")
        text = sibling(__file__, "text").get_config(",".join(rest))
        text.model.attention = "linear,ring"
        text.model.linear.update(dict(c.model.linear))
        if rest:
            text.model.linear.chunk_size = 16
        return text
    for v in variants:
        if v == "smoke":
            c.model.update(embed=32, mlp=64, block_q=16, block_k=16)
            c.model.linear.chunk_size = 16
            c.data.update(seq_len=64, num_pairs=8, num_queries=4)
            c.train.update(steps=6, batch_size=4, log_every=2, eval_every=0,
                           checkpoint_every=3, warmup_steps=2)
            c.eval.update(batch_size=4, batches=1, lengths=(64,))
        elif v == "softmax":
            c.model.attention = "ring"
        else:
            raise ValueError(f"configs/hybrid.py: unknown variant {v!r}; known: smoke, softmax, text")
    return c
