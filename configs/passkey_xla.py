"""The default passkey model with `xla` attention: the dense baseline.

    python experiments/train.py --config configs/passkey_xla.py --workdir out/passkey_xla

Same model, data, mesh and steps as configs/passkey.py; attention is
`jax.nn.dot_product_attention` in the natural (contiguous) layout, which XLA
shards by gathering keys and values. Expect the same accuracy as the ring
run (>= 0.9 at 1024 tokens) in about 8 minutes on a 2-core machine; at 1024
tokens xla is not yet slow, the gap grows with length (see
`experiments/bench.py --part train`). Variant `:smoke` runs in seconds.
"""

from lca.train.config_files import sibling


def get_config(arg=""):
    c = sibling(__file__, "passkey").get_config(arg)
    c.model.attention = "xla"
    c.model.layout = "contiguous"
    return c
