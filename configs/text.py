"""Byte-level language model on the Python standard library's source (no downloads).

    python experiments/train.py --config configs/text.py --workdir out/text

Ring attention, zigzag layout, 512-byte packed sequences with segment ids
(documents never attend across each other, positions restart at each file),
a 2-layer model (embed 128, 4 heads), on a (data=2, fsdp=2, sequence=2) mesh
of 8 emulated CPU devices: parameters are sharded over `fsdp` by their
`embed` axis. Validation is a held-out 5% of the files. Expect validation
bits per byte to fall from 8 (uniform) to about 3.2 after the default 300
steps, in about 4 minutes on a 2-core machine; see metrics.jsonl and
summary.png.

Variants: `:smoke` (seconds, for tests), any kernel of `lca.kernels.registry`
(`:xla`, `:blockwise`, ...).
"""

from lca.train.config_files import set_kernel, sibling, unknown_variant


def get_config(arg=""):
    variants = [v for v in (arg or "").split(",") if v]
    c = sibling(__file__, "passkey").base_config()
    c.mesh = {"data": 2, "fsdp": 2, "sequence": 2}
    c.model.update(vocab_size=256, embed=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                   mlp=512, attention="ring", layout="zigzag", block_q=128, block_k=128)
    c.data.update(task="text", seq_len=512, vocab_size=256, max_bytes=0, curriculum=())
    c.train.update(steps=300, batch_size=8, learning_rate=3e-3, warmup_steps=30,
                   eval_every=100, checkpoint_every=100, log_every=10)
    c.eval.update(batch_size=8, batches=4, lengths=(), depth_bins=10)
    for v in variants:
        if v == "smoke":
            c.model.update(embed=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=64,
                           block_q=16, block_k=16)
            c.data.update(seq_len=64, max_bytes=200_000)
            c.train.update(steps=6, batch_size=4, log_every=2, eval_every=0,
                           checkpoint_every=3, warmup_steps=2)
            c.eval.update(batch_size=4, batches=1)
        elif not set_kernel(c, v):
            raise unknown_variant(__file__, v, ("smoke",))
    return c
