"""Calibration for GPTQ: a text carried through the model layer by layer while it is built.

Within a layer, the calibration sequences step together through the reference layer
(reference.decoder_layer_steps): at each group of linears (q/k/v, output, gate/up, down) the
inputs of all sequences make the Gram matrix that group is quantized against, and the quantized
weights are what the sequences then go on with. So every linear is fitted to the inputs the
quantized model will really give it (GPTQ's "true sequential" order), in one pass per layer.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from edgellm import dtypes
from edgellm.errors import EdgeLLMError
from edgellm.quant.gptq import Gram
from edgellm.runtime import reference

# edgellm/compiler/texts/ (SOURCES.md there): prose, code and chat turns, then Python's reference
DEFAULT_TEXTS = ("mixed.txt", "python_docs.txt")


def calibration_text(path: str | None) -> str:
    if path is None:
        texts = resources.files("edgellm.compiler").joinpath("texts")
        return "\n\n".join(texts.joinpath(name).read_text("utf-8") for name in DEFAULT_TEXTS)
    try:
        return Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"cannot read the calibration text {path}: {e}") from None


class Calibration:
    """Hidden states of the calibration tokens, in sequences of up to `seq_len` tokens that each
    start at position 0 with an empty KV cache of `kv_cache_len` positions."""

    def __init__(self, cfg, embed: np.ndarray, ids: list[int], seq_len: int, kv_cache_len: int):
        if len(ids) < 2:
            raise EdgeLLMError("the calibration text is too short (fewer than 2 tokens)")
        self.cfg, self.kv_cache_len = cfg, kv_cache_len
        seq_len = min(seq_len, kv_cache_len)
        self.tokens = len(ids)
        rows = dtypes.round_to(embed[ids].astype(np.float32), "bf16")  # as the runtime reads them
        rows *= np.float32(cfg.embed_scale)
        self.hidden = [rows[s:s + seq_len] for s in range(0, len(ids), seq_len)]

    def fit_layer(self, layer: int, float_w: dict,
                  quantize: Callable[[str, Gram], np.ndarray]) -> dict[str, np.ndarray]:
        """Step the sequences through decoder layer `layer`, calling quantize(linear name, Gram
        matrix of its inputs) -> its dequantized weights for each linear in turn; moves the
        hidden states through the quantized layer and returns its weights (float_w with the
        linears replaced)."""
        w = dict(float_w)
        shape = (self.kv_cache_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        runs = [reference.decoder_layer_steps(h, w, self.cfg, 0, np.zeros(shape, np.float32),
                                              np.zeros(shape, np.float32), "fp32",
                                              layer=layer)
                for h in self.hidden]
        for group, linears in reference.LINEAR_INPUTS.items():
            gram = None
            for run in runs:
                name, x = next(run)
                assert name == group, (name, group)
                if gram is None:
                    gram = Gram(x.shape[-1])
                gram.add(x)
            for linear in linears:
                w[linear] = quantize(linear, gram)
        self.hidden = [_finish(run) for run in runs]
        return w

    def lm_head_gram(self, output_norm: np.ndarray) -> Gram:
        gram = Gram(self.cfg.hidden_size)
        for h in self.hidden:
            x = reference.rms_norm(h, output_norm, self.cfg.norm_eps)
            gram.add(x * np.float32(self.cfg.logit_scale))
        return gram


def _finish(steps) -> np.ndarray:
    try:
        next(steps)
    except StopIteration as done:
        return done.value
    raise AssertionError("the layer yielded more inputs than LINEAR_INPUTS lists")


def calibration_ids(tokenizer_json: str, text: str, max_tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(tokenizer_json).encode(text, add_special_tokens=False).ids
    return ids[:max_tokens]

