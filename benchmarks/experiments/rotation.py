"""Build with the residual stream rotated (QuaRot/SpinQuant-style, weights only): tried for
docs/QUALITY.md's "Tried and rejected", not part of edgellm.

    python benchmarks/experiments/rotation.py SOURCE -o OUT [edgellm build options]
    python benchmarks/paired_quality.py PLAIN OUT

A random orthogonal Q (QR of a Gaussian matrix, seed ROT_SEED, default 0) rotates the hidden
state between layers, x -> x Q, and the weights absorb it exactly: each RMSNorm's weight g is
folded into the linears it feeds (RMSNorm is then weightless, and commutes with Q since it only
divides by the norm), those linears read W diag(g) Q, the ones writing into the residual
(attention output, ffn_down) Q^T W, and the embedding rows E Q (the artifact's embedding table
is then not the source's). Unquantized the model is unchanged; the point is that the weights
quantized are no longer the source's. Untied lm_head only (the embedding and the lm_head are
transformed differently).
"""

import os
import sys

import numpy as np

from edgellm import cli
from edgellm.compiler import builder

NORM_OF = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm",
           "ffn_gate": "ffn_norm", "ffn_up": "ffn_norm", "lm_head": "output_norm"}
WRITES_RESIDUAL = ("attn_out", "ffn_down")


def random_rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))  # Haar-distributed


def rotated(source, q: np.ndarray):
    if source.config.tie_word_embeddings or not source.has("lm_head"):
        raise SystemExit("rotation.py: tied embeddings are not handled")
    read = source.tensor

    def tensor(name, layer=None):
        w = read(name, layer=layer).astype(np.float64)
        if name in ("attn_norm", "ffn_norm", "output_norm"):
            return np.ones(w.shape, np.float32)
        if name == "embed":
            w = w @ q
        elif name in NORM_OF:
            w = (w * read(NORM_OF[name], layer=layer)) @ q
        elif name in WRITES_RESIDUAL:
            w = q.T @ w
        return w.astype(np.float32)

    source.tensor = tensor
    return source


def main():
    open_source = builder.open_source
    seed = int(os.environ.get("ROT_SEED", "0"))

    def open_rotated(path):
        source = open_source(path)
        return rotated(source, random_rotation(source.config.hidden_size, seed))

    builder.open_source = open_rotated
    return cli.main(["build", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
