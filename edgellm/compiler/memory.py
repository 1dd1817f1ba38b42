"""Will it fit? Memory a build and a run of a model need, checked before any work is done.

Run time (the ORT engine): the layer and post weights as stored (memory-mapped and read on every
token), the KV cache (fp32), and about 150 MB of runtime (ORT's packed lm_head and buffers: 667 MB
steady RSS measured for 0.51 GB of Qwen2-0.5B s8 weights + 25 MB of cache). The bf16 embedding
table is mapped too, but only the rows of the tokens seen are read. (On Arm cores without
dotprod the 8-bit weights are re-laid at load for ONNX Runtime's integer GEMM, which packs them
as MatMulNBits does; the load leaves some heap behind: 0.74-0.82 GB steady RSS instead of
0.68 GB for Qwen2.5-Coder-0.5B s8 on x86, not counted here beyond RUNTIME_OVERHEAD.)
Build: tensors are streamed one at a time; the peak is set by the largest one (the embedding or
lm_head) held as float32 with its quantization temporaries, about 4x its float32 size, plus the
interpreter (2.4 GB measured for Qwen2-0.5B, whose embedding is 0.54 GB as float32).
GPTQ adds its calibration: every calibration sequence's activations inside a layer at once, and
the Gram matrix of the widest linear input (see calibration_bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.machine import machine_memory  # noqa: F401  (re-exported; tests patch it here)

from edgellm.errors import EdgeLLMError

RUNTIME_OVERHEAD = 150 * 2**20
BUILD_OVERHEAD = 300 * 2**20
GB = 1e9


class NotEnoughMemory(EdgeLLMError):
    """The model (or its float reference) would not fit this machine's RAM."""


def matrix_bytes(scheme, out_features: int, in_features: int) -> int:
    """Bytes of one [out, in] weight as the scheme stores it (integer: codes of every group, the
    last one padded, plus an fp32 scale per group)."""
    d = scheme.to_dict()
    if "bits" in d:
        groups = -(-in_features // d["group_size"])
        zero_points = -(-groups * d["bits"] // 8) if not d.get("symmetric", True) else 0
        return out_features * (groups * (d["group_size"] * d["bits"] // 8 + 4) + zero_points)
    return out_features * in_features * {"bf16": 2, "fp16": 2, "fp32": 4}[d["name"]]


def layer_bytes(cfg, scheme) -> int:
    """One decoder layer: its seven linears, two norms and (qwen2) q/k/v biases."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    linears = [(q, d), (kv, d), (kv, d), (d, q), (i, d), (i, d), (d, i)]
    biases = (q + 2 * kv) * 4 if cfg.qkv_bias else 0
    return sum(matrix_bytes(scheme, o, n) for o, n in linears) + 2 * d * 4 + biases


@dataclass(frozen=True)
class Footprint:
    layer_weights: int  # bytes of all decoder-layer weights as stored
    post_weights: int  # final norm + lm_head
    embedding: int  # the bf16 table (mapped; rows read on demand)
    kv_cache: int
    build_peak: int

    @property
    def runtime(self) -> int:
        return self.layer_weights + self.post_weights + self.kv_cache + RUNTIME_OVERHEAD


def calibration_bytes(cfg, tokens: int) -> int:
    """GPTQ's calibration: per token, the layer's activations held for every sequence (about
    eight hidden-size and two intermediate-size float32 vectors at the MLP's down projection);
    the Gram matrix (float64) with its float32 product; one batch of Gram rows. (Qwen2-0.5B,
    32768 tokens: 2.7 GB by this count, on top of round to nearest's 2.5 GB; 4.6 GB peak RSS
    measured.)"""
    d, i = cfg.hidden_size, cfg.intermediate_size
    return 4 * tokens * (8 * d + 2 * i) + 12 * i * i + 4 * 8192 * i


def footprint(cfg, scheme, post_scheme, kv_cache_len: int,
              calibration_tokens: int = 0, cache_type: str = "fp32") -> Footprint:
    layers = cfg.num_layers * layer_bytes(cfg, scheme)
    post = matrix_bytes(post_scheme, cfg.vocab_size, cfg.hidden_size) + cfg.hidden_size * 4
    kv = cfg.kv_bytes_per_position(cache_type) * kv_cache_len
    largest = max(cfg.vocab_size * cfg.hidden_size, cfg.intermediate_size * cfg.hidden_size) * 4
    calibration = calibration_bytes(cfg, calibration_tokens) if calibration_tokens else 0
    return Footprint(int(layers), int(post), cfg.vocab_size * cfg.hidden_size * 2, kv,
                     4 * largest + BUILD_OVERHEAD + calibration)


def check_fits(cfg, scheme, post_scheme, kv_cache_len: int,
               calibration_tokens: int = 0) -> Footprint:
    """Refuse, with the numbers, a model that this machine could not build or run."""
    need = footprint(cfg, scheme, post_scheme, kv_cache_len, calibration_tokens)
    total, available = machine_memory()
    if need.runtime > total:
        raise NotEnoughMemory(
            f"this model needs about {need.runtime / GB:.1f} GB of RAM to run as "
            f"{scheme.name} (weights {(need.layer_weights + need.post_weights) / GB:.2f} GB + "
            f"KV cache {need.kv_cache / GB:.2f} GB + runtime {RUNTIME_OVERHEAD / GB:.2f} GB) and "
            f"this machine has {total / GB:.1f} GB; try --weight-type s4, a shorter "
            f"--kv-cache-len, or a machine with more memory (--no-memory-check builds anyway)")
    if need.build_peak > available:
        raise NotEnoughMemory(
            f"building this model takes about {need.build_peak / GB:.1f} GB of RAM (its largest "
            f"tensor as float32, with quantization temporaries"
            f"{', and GPTQ calibration' if calibration_tokens else ''}) and "
            f"{available / GB:.1f} GB are available now "
            f"({'fewer --calibration-tokens, ' if calibration_tokens else ''}"
            f"--no-memory-check builds anyway)")
    return need
