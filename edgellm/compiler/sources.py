"""Checkpoint sources: a Hugging Face directory or a GGUF file, seen as canonical float32 tensors.

A source knows its architecture, its ModelConfig and its tokenizer, hands out one tensor at a
time by canonical name (`tensor("attn_q", layer=3)`), and at the end reports any source tensor
that was neither used nor deliberately ignored, so a wrong mapping is an error, not a silent drop.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from edgellm.arch import ArchSpec, ModelConfig, get_arch
from edgellm.compiler import safetensors_io
from edgellm.compiler.tokenizer_info import TokenizerInfo, from_gguf_metadata, from_hf_dir
from edgellm.errors import EdgeLLMError
from edgellm.fileutil import read_json

ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency rope divisors (Llama-3.1/3.2)


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{L\}", r"\d+") + "$")


class Source:
    """Common bookkeeping: which source tensors were consumed."""

    kind = "?"
    _fused_cache: tuple[str | None, np.ndarray | None] = (None, None)  # (name, last fused tensor)
    spec: ArchSpec
    config: ModelConfig
    path: Path

    def _source_names(self) -> set[str]:
        raise NotImplementedError

    def _read(self, source_name: str) -> np.ndarray:
        raise NotImplementedError

    def _layer_map(self) -> dict[str, str]:
        raise NotImplementedError

    def _global_map(self) -> dict[str, str]:
        raise NotImplementedError

    def _ignored(self) -> tuple[str, ...]:
        return ()

    def has(self, name: str) -> bool:
        return self._global_map()[name] in self._source_names()

    def _fused_map(self) -> dict[str, tuple[str, ...]]:
        return {}

    def tensor(self, name: str, layer: int | None = None) -> np.ndarray:
        """The canonical tensor `name` (of decoder layer `layer`) as float32, shape-checked."""
        if layer is not None:
            for template, parts in self._fused_map().items():
                if name in parts:
                    return self._split(name, template.replace("{L}", str(layer)), parts)
        table = self._global_map() if layer is None else self._layer_map()
        return self._load(table[name].replace("{L}", str(layer)),
                          self.spec.expected_shape(name, self.config))

    def _load(self, source_name: str, expected: tuple[int, ...]) -> np.ndarray:
        if source_name not in self._source_names():
            raise EdgeLLMError(f"{self.path}: tensor {source_name} not found in the source")
        self._used.add(source_name)
        array = self._read(source_name)
        if tuple(array.shape) != expected:
            raise EdgeLLMError(
                f"{self.path}: tensor {source_name} has shape {tuple(array.shape)}, "
                f"expected {expected} from the config"
            )
        return array

    def _split(self, name: str, source_name: str, parts: tuple[str, ...]) -> np.ndarray:
        """Rows of a fused tensor (e.g. Phi-3's qkv_proj = q | k | v); the fused tensor is read
        once for all its parts."""
        cached_name, fused = self._fused_cache
        if cached_name != source_name:
            fused = self._load(source_name, self.spec.fused_shape(parts, self.config))
            self._fused_cache = (source_name, fused)
        rows = [self.spec.expected_shape(p, self.config)[0] for p in parts]
        start = sum(rows[:parts.index(name)])
        return np.ascontiguousarray(fused[start:start + rows[parts.index(name)]])

    def _expected_names(self) -> set[str]:
        layer_map, fused = self._layer_map(), self._fused_map()
        in_fused = {p for parts in fused.values() for p in parts}
        templates = [layer_map[n] for n in self.spec.layer_tensor_names(self.config)
                     if n not in in_fused] + list(fused)
        names = {t.replace("{L}", str(i)) for t in templates for i in range(self.config.num_layers)}
        return names | set(self._global_map().values())

    def _unexplained(self, names: set[str]) -> list[str]:
        ignored = [_template_regex(t) for t in self._ignored()]
        return sorted(n for n in names if not any(r.match(n) for r in ignored))

    def check_names(self) -> None:
        """Before any work: every source tensor must be mapped or deliberately ignored, and
        every tensor the config implies must be there."""
        self._raise_if_unmapped(self._unexplained(self._source_names() - self._expected_names()))
        expected = self._expected_names()
        if self.config.tie_word_embeddings:
            expected.discard(self._global_map()["lm_head"])
        missing = sorted(expected - self._source_names())
        if missing:
            more = " ..." if len(missing) > 4 else ""
            raise EdgeLLMError(f"{self.path}: the config ({self.config.num_layers} layers) calls "
                               f"for tensors the source lacks: {', '.join(missing[:4])}{more}")

    def check_all_used(self) -> None:
        """After the build: every source tensor was consumed or deliberately ignored."""
        self._raise_if_unmapped(self._unexplained(self._source_names() - self._used))

    def _raise_if_unmapped(self, names: list[str]) -> None:
        if names:
            more = " ..." if len(names) > 8 else ""
            raise EdgeLLMError(f"{self.path}: source tensors not mapped by the "
                               f"{self.spec.name} spec: {', '.join(names[:8])}{more}")


class HFSource(Source):
    """A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)."""

    kind = "hf"

    def __init__(self, path: Path):
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise EdgeLLMError(f"{path}: no config.json (not a Hugging Face model directory)")
        raw = read_json(cfg_path)
        if not isinstance(raw, dict):
            raise EdgeLLMError(f"{cfg_path} is not a JSON object (it holds a "
                               f"{type(raw).__name__})")
        self.spec = get_arch(str(raw.get("model_type")))
        self.config = self.spec.config_from_hf(raw)
        self.hf_config = raw
        self._tensors = safetensors_io.open_checkpoint(path)
        self._used: set[str] = set()
        if self.config.tie_word_embeddings and self.spec.hf_global["lm_head"] in self._tensors:
            self._used.add(self.spec.hf_global["lm_head"])  # a redundant copy of the tie

    def tensor(self, name: str, layer: int | None = None) -> np.ndarray:
        array = super().tensor(name, layer)
        if self.spec.hf_norm_offset and name.endswith("norm"):  # Gemma's (1 + weight)
            array = array + np.float32(self.spec.hf_norm_offset)
        return array

    def _source_names(self):
        return set(self._tensors)

    def _read(self, source_name):
        return self._tensors[source_name].as_float32()

    def _layer_map(self):
        return self.spec.hf_layer

    def _fused_map(self):
        return self.spec.hf_fused

    def _global_map(self):
        return self.spec.hf_global

    def _ignored(self):
        return self.spec.hf_ignored

    def tokenizer(self) -> TokenizerInfo:
        return from_hf_dir(self.path, self.hf_config)


class GGUFSource(Source):
    """A GGUF file: tensors dequantized with the `gguf` package, config from its metadata."""

    kind = "gguf"

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # gguf raises ValueError/IndexError/etc. on damaged files
            raise EdgeLLMError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._check_complete()
        self.meta = {k: self._field(k) for k in self._reader.fields if not
                     k.startswith("tokenizer.ggml.") or k.endswith("_id") or
                     k in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                           "tokenizer.ggml.add_bos_token",
                           "tokenizer.ggml.add_space_prefix")}
        self._by_name = {t.name: t for t in self._reader.tensors}
        self.spec = get_arch(str(self.meta.get("general.architecture")))
        if "tokenizer.ggml.tokens" not in self._reader.fields:
            raise EdgeLLMError(f"{path}: the GGUF has no tokenizer (tokenizer.ggml.tokens is "
                               f"missing), so its vocabulary is unknown")
        vocab = len(self._reader.fields["tokenizer.ggml.tokens"].data)
        tied = self.spec.gguf_global["lm_head"] not in self._by_name
        self.config = self.spec.config_from_gguf(self.meta, vocab, tied)
        self._used: set[str] = set()
        if ROPE_FREQS in self._by_name:
            self.config = self._with_rope_freqs(self.config)

    def _with_rope_freqs(self, cfg):
        """Llama-3.1/3.2 GGUFs carry their rope scaling as per-frequency divisors, not as
        metadata: the config gets them as `freq_factors` scaling."""
        if cfg.rope_scaling:
            raise EdgeLLMError(f"{self.path}: both rope scaling metadata "
                               f"({cfg.rope_scaling['rope_type']}) and a {ROPE_FREQS} tensor")
        factors = self._read(ROPE_FREQS).reshape(-1)
        return dataclasses.replace(cfg, rope_scaling={
            "rope_type": "freq_factors", "factors": [float(f) for f in factors]})

    def _field(self, key):
        try:
            return self._reader.fields[key].contents()
        except Exception:
            return None

    def _check_complete(self):
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise EdgeLLMError(f"{self.path}: truncated GGUF file (tensor {t.name} is cut off)")

    def _source_names(self):
        return set(self._by_name)

    def _read(self, source_name):
        t = self._by_name[source_name]
        array = _dequantize_rows(t.data, t.tensor_type)
        if self.spec.gguf_qk_permuted and source_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.config.num_heads if "attn_q" in source_name else self.config.num_kv_heads
            array = unpermute_rope_rows(array, heads)
        return array

    def _layer_map(self):
        return self.spec.gguf_layer

    def _fused_map(self):
        return self.spec.gguf_fused

    def _global_map(self):
        return self.spec.gguf_global

    def _ignored(self):
        return (ROPE_FREQS,)  # read into the config's rope scaling (above)

    def tokenizer(self) -> TokenizerInfo:
        return from_gguf_metadata(self._reader, self.meta)


def _dequantize_rows(data: np.ndarray, qtype, rows: int = 8192) -> np.ndarray:
    """gguf's dequantize, a block of rows at a time: its temporaries are several times the
    output, which for a 150k-row embedding would dominate the build's peak memory."""
    import gguf

    if data.ndim < 2 or data.shape[0] <= rows:
        return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)
    first = gguf.quants.dequantize(data[:1], qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), np.float32)
    for start in range(0, data.shape[0], rows):
        out[start:start + rows] = gguf.quants.dequantize(data[start:start + rows], qtype)
    return out


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave, back to the HF rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_source(path: str | Path) -> Source:
    """A GGUF file or a HF directory, by what the path is (never by its name)."""
    path = Path(path)
    if path.is_dir():
        return HFSource(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return GGUFSource(path)
        raise EdgeLLMError(f"{path} is neither a GGUF file nor a Hugging Face model directory")
    raise EdgeLLMError(f"input path {path} does not exist")
