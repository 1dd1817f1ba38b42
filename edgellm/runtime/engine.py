"""The numpy engine: an artifact's weights (dequantized once) driven by the reference forward."""

from __future__ import annotations

import numpy as np

from edgellm import dtypes
from edgellm.artifact.reader import Artifact
from edgellm.arch.spec import LAYER_LINEARS
from edgellm.errors import EdgeLLMError
from edgellm.runtime import reference


def _dequantize_file(tensors: dict[str, np.ndarray], scheme, linears: tuple[str, ...],
                     cfg) -> dict[str, np.ndarray]:
    out = {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items() if "." not in name}
    for name in linears:
        parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        in_features = cfg.intermediate_size if name == "ffn_down" else (
            cfg.num_heads * cfg.head_dim if name == "attn_out" else cfg.hidden_size)
        out[name] = np.ascontiguousarray(scheme.dequantize(parts, in_features), dtype=np.float32)
    return out


def embedding_rows(table: np.ndarray, tokens: np.ndarray, cfg) -> np.ndarray:
    """Rows of the bf16 embedding table as float32, times the model's embed_scale (MiniCPM)."""
    rows = dtypes.bf16_bits_to_fp32(table[tokens])
    return rows * np.float32(cfg.embed_scale) if cfg.embed_scale != 1.0 else rows


class NumpyEngine:
    """forward(tokens, pos) over a preallocated KV cache; the reference every engine must match.

    Holds float32 copies of the weights (4 bytes per parameter): simple and exact, not fast.
    """

    def __init__(self, artifact: Artifact, slots: int = 1, context: int | None = None):
        m = artifact.manifest
        self.config = cfg = artifact.config
        self.kv_cache_len = context or m.kv_cache_len  # rotary tables follow it (reference)
        self.prefill_len = m.prefill_len
        self.hidden_type = m.hidden_state_type
        self.embed = artifact.embedding()  # [vocab, hidden] bf16 bits, mmapped
        self.layers = [_dequantize_file(artifact.tensors(f), artifact.layer_scheme(f),
                                        LAYER_LINEARS, cfg) for f in m.layers]
        self.post_weights = _dequantize_file(artifact.tensors(m.post), artifact.post_scheme,
                                             ("lm_head",), cfg)
        shape = (slots, cfg.num_layers, self.kv_cache_len, cfg.num_kv_heads, cfg.head_dim)
        store = dtypes.STORAGE_DTYPE[self.hidden_type]
        self.slots = slots
        self.k_slots = np.zeros(shape, store)  # [slots, layers, kv_len, kv_heads, head_dim]
        self.v_slots = np.zeros(shape, store)
        self.k_cache, self.v_cache = self.k_slots[0], self.v_slots[0]  # slot 0's

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return dtypes.round_to(embedding_rows(self.embed, tokens, self.config), self.hidden_type)

    def forward(self, tokens, pos: int, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        """Run tokens at positions pos.. of a slot; logits [vocab] of the last one (or
        [n, vocab])."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if pos + len(tokens) > self.kv_cache_len:
            raise EdgeLLMError(f"positions {pos}..{pos + len(tokens) - 1} exceed the KV cache "
                               f"of {self.kv_cache_len}")
        h = self.embed_tokens(tokens)
        for i, w in enumerate(self.layers):
            h = reference.decoder_layer(h, w, self.config, pos, self.k_slots[slot, i],
                                        self.v_slots[slot, i], self.hidden_type, layer=i)
        if not all_logits:
            h = h[-1:]
        logits = reference.post(h, self.post_weights, self.config)
        return logits if all_logits else logits[0]

    def decode_rows(self, first: int, tokens: list[int], positions: list[int]) -> np.ndarray:
        """One token for each of the slots first, first+1, ... at its own position; logits
        [rows, vocab]. The reference runs them one by one; a row whose token is -1 has no
        request and runs token 0 there, as ONNX Runtime's batch does (so a position it must not
        touch shows here too)."""
        return np.stack([self.forward([max(token, 0)], pos, slot=first + row)
                         for row, (token, pos) in enumerate(zip(tokens, positions))])

    def kv_bytes(self) -> int:
        """The KV cache of all slots, as allocated."""
        return self.k_slots.nbytes + self.v_slots.nbytes

    def decode_weight_bytes(self) -> int:
        """The weights one decoded token reads: the float32 copies of every layer's and the
        lm_head's matrices."""
        return sum(a.nbytes for w in [*self.layers, self.post_weights] for a in w.values())

    def kv_snapshot(self, n: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Copies of a slot's first n cache positions of every layer."""
        return self.k_slots[slot, :, :n].copy(), self.v_slots[slot, :, :n].copy()

    def kv_restore(self, snapshot: tuple[np.ndarray, np.ndarray], slot: int = 0,
                   at: int = 0) -> int:
        """Put a snapshot into a slot at positions at..; the position after it."""
        k, v = snapshot
        end = at + k.shape[1]
        if end > self.kv_cache_len:
            raise EdgeLLMError(f"positions {at}..{end - 1} exceed the KV cache "
                               f"of {self.kv_cache_len}")
        self.k_slots[slot, :, at:end], self.v_slots[slot, :, at:end] = k, v
        return end
