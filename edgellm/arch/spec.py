"""What an architecture is: a config read from config.json / GGUF metadata, and tensor name tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from edgellm.arch import rope
from edgellm.errors import EdgeLLMError

# Canonical tensor names. Per-layer ones live in one weight file per decoder layer.
LAYER_NORMS = ("attn_norm", "ffn_norm")
QK_NORMS = ("attn_q_norm", "attn_k_norm")  # per-head RMS norms of q and k (Qwen3, Gemma 3)
POST_NORMS = ("attn_post_norm", "ffn_post_norm")  # on each branch's output (Gemma 2/3)
LAYER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_gate", "ffn_up", "ffn_down")
QKV_BIASES = ("attn_q_bias", "attn_k_bias", "attn_v_bias")
# linears that read the same input: stored side by side, part by part, so that one matmul over
# all of them (N concatenated) reads them in place (edgellm.onnx.graphs)
FUSED_LINEARS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))
GLOBALS = ("embed", "output_norm", "lm_head")

# HF config.json keys that ModelConfig reads; everything else is kept in `extra`.
_HF_KEYS = {
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rope_parameters",
    "rope_scaling", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "hidden_act",
    "partial_rotary_factor", "hidden_activation", "query_pre_attn_scalar", "layer_types",
    "rope_local_base_freq", "sliding_window", "sliding_window_pattern",
}
# HF activation names -> the gated FFN's activation here
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions and hyper-parameters of a decoder-only transformer, independent of the source."""

    arch: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    hidden_act: str = "silu"
    rope_scaling: dict | None = None
    rotary_dim: int | None = None  # None: the whole head (partial rotary otherwise)
    # MiniCPM's scalars (1.0 elsewhere): embeddings times embed_scale, each residual branch
    # (attention, MLP) times residual_scale, the final normed hidden state times logit_scale.
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    sliding_window: int | None = None  # attention window (Phi-3); builds refuse a longer context
    # Qwen3 / Gemma 3 mechanisms (off elsewhere)
    qk_norm: bool = False  # RMS norms over each head of q and k, before rope
    post_norms: bool = False  # RMS norms on the attention and FFN outputs before the residual add
    attn_scale: float | None = None  # softmax scale; None: 1/sqrt(head_dim)
    # per layer, the sliding window (keys at distance < window are seen) or None (global);
    # None: every layer global. Gemma 3 interleaves five local layers with one global.
    layer_windows: list | None = None
    rope_local_theta: float | None = None  # rope base of the sliding-window layers (Gemma 3)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        sizes = {"hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                 "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                 "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
                 "vocab_size": self.vocab_size}
        wrong = [f"{k} {v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if wrong:
            raise EdgeLLMError(f"the model config has impossible sizes: {', '.join(wrong)} "
                               f"(each must be a positive integer)")
        if self.num_heads % self.num_kv_heads:
            raise EdgeLLMError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}"
            )
        if self.hidden_act not in ACTIVATIONS.values():
            raise EdgeLLMError(f"hidden_act {self.hidden_act!r} is not supported "
                               f"({', '.join(sorted(ACTIVATIONS))})")
        if self.layer_windows is not None:
            if len(self.layer_windows) != self.num_layers or not all(
                    w is None or (isinstance(w, int) and w >= 1) for w in self.layer_windows):
                raise EdgeLLMError(f"layer_windows must give each of the {self.num_layers} "
                                   f"layers a window >= 1 or none")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in rope.SUPPORTED:
            raise EdgeLLMError(f"rope scaling {kind!r} is not supported yet "
                               f"({', '.join(rope.SUPPORTED)})")
        needs = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings"),
                 "longrope": ("long_factor", "short_factor", "original_max_position_embeddings"),
                 "linear": ("factor",), "freq_factors": ("factors",)}.get(kind, ())
        missing = [k for k in needs if self.rope_scaling.get(k) is None]
        if missing:
            raise EdgeLLMError(f"rope scaling {kind!r} lacks {', '.join(missing)}")
        dim = rope.rotary_dim(self)
        if dim % 2 or dim > self.head_dim:
            raise EdgeLLMError(f"rotary dimension {dim} must be even and at most head_dim "
                               f"{self.head_dim}")
        per_frequency = {"longrope": ("long_factor", "short_factor"), "freq_factors": ("factors",)}
        for key in per_frequency.get(kind, ()):
            if len(self.rope_scaling[key]) != dim // 2:
                raise EdgeLLMError(f"rope {key} has {len(self.rope_scaling[key])} entries, "
                                   f"expected rotary_dim / 2 = {dim // 2}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window, or None when it attends to the whole context."""
        return self.layer_windows[layer] if self.layer_windows else None

    def kv_bytes_per_position(self, cache_type: str = "fp32") -> int:
        """K and V of every layer for one position in float32 (as both engines hold them at
        most; int8 with --cache-type int8): what a KV cache costs per position of context."""
        size = 1 if cache_type == "int8" else 4
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * size

    def layer_rope(self, layer: int) -> "ModelConfig":
        """The config whose rope tables layer `layer` uses: Gemma 3's local layers rotate with
        their own base and no scaling."""
        if self.window(layer) is None or self.rope_local_theta is None:
            return self
        return dataclasses.replace(self, rope_theta=self.rope_local_theta, rope_scaling=None)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)


def _rope_from_hf(cfg: dict) -> tuple[float, dict | None, float]:
    """(theta, scaling, partial_rotary_factor). rope_theta sits at top level (transformers 4.x)
    or under rope_parameters (5.x); so may partial_rotary_factor."""
    params = dict(cfg.get("rope_parameters") or {})
    params = dict(params.get("full_attention", params))  # Gemma 3: one entry per layer type
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        theta = 10000.0
    partial = float(cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items()
                                          if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}
        kind = scaling.pop("type", None)
        scaling["rope_type"] = scaling.get("rope_type", kind or "default")
        if scaling["rope_type"] == "su":  # Phi-3's early name for longrope
            scaling["rope_type"] = "longrope"
        if scaling["rope_type"] in ("longrope", "llama3"):
            scaling.setdefault("original_max_position_embeddings",
                               cfg.get("original_max_position_embeddings"))
        if scaling["rope_type"] == "default" and len(scaling) == 1:
            scaling = None
    return float(theta), scaling or None, partial


@dataclass(frozen=True)
class ArchSpec:
    """One architecture family: how its sources name tensors and which flags it sets."""

    name: str
    hf_layer: dict[str, str]  # canonical -> HF name with {L} for the layer index
    hf_global: dict[str, str]
    hf_ignored: tuple[str, ...]  # HF names (with {L}) deliberately dropped
    gguf_layer: dict[str, str]
    gguf_global: dict[str, str]
    qkv_bias: bool  # q/k/v projections carry a bias
    gguf_qk_permuted: bool  # llama.cpp's converter interleaved q/k rows for its rope
    # fused source tensor (with {L}) -> the canonical tensors stacked in its rows, in order
    hf_fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gguf_fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tie_default: bool = False  # tie_word_embeddings when config.json does not say
    # config.json -> further ModelConfig fields (MiniCPM's scales, Phi-3's sliding window)
    hf_extra: Callable[[dict], dict] | None = None
    gguf_extra: Callable[[dict], dict] | None = None  # the same from GGUF metadata
    # added to every RMSNorm weight read from config.json checkpoints: Gemma scales by
    # (1 + weight); llama.cpp's converter already added the 1 into the GGUF's norm tensors
    hf_norm_offset: float = 0.0

    def layer_tensor_names(self, cfg: ModelConfig) -> tuple[str, ...]:
        names = LAYER_NORMS + LAYER_LINEARS
        names += QKV_BIASES if cfg.qkv_bias else ()
        names += QK_NORMS if cfg.qk_norm else ()
        return names + (POST_NORMS if cfg.post_norms else ())

    def expected_shape(self, name: str, cfg: ModelConfig) -> tuple[int, ...]:
        d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        shapes = {
            "attn_norm": (d,), "ffn_norm": (d,), "output_norm": (d,),
            "attn_post_norm": (d,), "ffn_post_norm": (d,),
            "attn_q_norm": (cfg.head_dim,), "attn_k_norm": (cfg.head_dim,),
            "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_out": (d, q),
            "attn_q_bias": (q,), "attn_k_bias": (kv,), "attn_v_bias": (kv,),
            "ffn_gate": (i, d), "ffn_up": (i, d), "ffn_down": (d, i),
            "embed": (v, d), "lm_head": (v, d),
        }
        return shapes[name]

    def fused_shape(self, parts: tuple[str, ...], cfg: ModelConfig) -> tuple[int, int]:
        shapes = [self.expected_shape(p, cfg) for p in parts]
        return sum(s[0] for s in shapes), shapes[0][1]

    def config_from_hf(self, cfg: dict) -> ModelConfig:
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            theta, scaling, partial = _rope_from_hf(cfg)
            if cfg.get("use_sliding_window"):
                raise EdgeLLMError(f"{self.name} with use_sliding_window=true is not supported yet")
            if cfg.get("attention_bias") and not self.qkv_bias:
                raise EdgeLLMError(f"{self.name} with attention_bias=true is not supported yet")
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            rotary = int(head_dim * partial)
            return ModelConfig(
                arch=self.name,
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                vocab_size=int(cfg["vocab_size"]),
                rope_theta=theta,
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", self.tie_default)),
                qkv_bias=self.qkv_bias,
                # an unknown name passes through, for ModelConfig's check to name it
                hidden_act=ACTIVATIONS.get(name := cfg.get("hidden_activation")
                                           or cfg.get("hidden_act") or "silu", name),
                rope_scaling=scaling,
                rotary_dim=rotary if rotary != head_dim else None,
                extra={k: v for k, v in cfg.items() if k not in _HF_KEYS},
                **(self.hf_extra(cfg) if self.hf_extra else {}),
            )
        except KeyError as e:
            raise EdgeLLMError(f"config.json lacks the key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise EdgeLLMError(f"config.json has a value of the wrong type: {e}") from None

    def config_from_gguf(self, meta: dict[str, Any], vocab_size: int, tied: bool) -> ModelConfig:
        a = self.name

        def get(key, default=None):
            value = meta.get(f"{a}.{key}", default)
            if value is None:
                raise EdgeLLMError(f"GGUF metadata lacks {a}.{key}")
            return value

        heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
        head_dim = int(get("attention.key_length", hidden // heads))
        rotary = int(get("rope.dimension_count", head_dim))
        scaling = None
        if meta.get(f"{a}.rope.scaling.type") not in (None, "none"):
            scaling = {"rope_type": meta[f"{a}.rope.scaling.type"],
                       "factor": float(meta.get(f"{a}.rope.scaling.factor", 1.0))}
        return ModelConfig(
            arch=a,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            vocab_size=vocab_size,
            rope_theta=float(get("rope.freq_base", 10000.0)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=tied,
            qkv_bias=self.qkv_bias,
            rope_scaling=scaling,
            rotary_dim=rotary if rotary != head_dim else None,
            **(self.gguf_extra({k[len(a) + 1:]: v for k, v in meta.items()
                                if k.startswith(a + ".")}) if self.gguf_extra else {}),
        )
