"""Emit the per-layer ONNX graphs, their weights referenced in place inside the layer files.

Each initializer is ONNX "external data" pointing at the tensor's offset in layer_NNN.bin, so the
weights are stored once. Ops are ONNX Runtime contrib ops where ORT has fast CPU kernels:
MatMulNBits (8/4-bit weights in the artifact's layout, accuracy_level 4), SimplifiedLayerNorm /
SkipSimplifiedLayerNormalization (RMSNorm), GroupQueryAttention (rotary + KV cache updated in place).

Layer graph, for b sequences of n new tokens each (b > 1: one token each, the server's batched
decode; each sequence at its own position):
    hidden [b, n, D] fp32, past_key / past_value [b, kv_heads, kv_cache_len, head_dim] fp32,
    seqlens_k [b] int32 (= tokens in that sequence's cache after this call - 1),
    total_seq_len [] int32 (the largest of them + 1)
    -> hidden_out [b, n, D], present_key / present_value (bound to the past buffers)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellm.arch.spec import LAYER_LINEARS, ModelConfig
from edgellm.arch.rope import rope_tables

MS = "com.microsoft"
_ONNX_TYPES = {"uint8": TensorProto.UINT8, "fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16,
               "bf16": TensorProto.BFLOAT16, "int8": TensorProto.INT8}
_ITEMSIZE = {"uint8": 1, "int8": 1, "fp32": 4, "fp16": 2, "bf16": 2}


def external_tensor(name: str, info: dict, file_name: str, shape=None) -> TensorProto:
    """An initializer whose bytes live at `info['offset']` of `file_name` (same directory)."""
    t = TensorProto()
    t.name = name
    t.data_type = _ONNX_TYPES[info["dtype"]]
    dims = list(shape if shape is not None else info["shape"])
    t.dims.extend(dims)
    length = _nbytes(info)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", file_name), ("offset", str(info["offset"])),
                       ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


class _GraphBuilder:
    def __init__(self, tensors: dict[str, dict], file_name: str, scheme: dict,
                 accuracy_level: int = 4):
        self.tensors, self.file_name, self.scheme = tensors, file_name, scheme
        self.accuracy_level = accuracy_level
        self.nodes: list = []
        self.inits: list = []

    def weight(self, name: str, shape=None) -> str:
        self.inits.append(external_tensor(name, self.tensors[name], self.file_name, shape))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}",
                                           domain=domain, **attrs))
        return outputs[0]

    def scaled(self, x: str, scale: float) -> str:
        """x * scale (MiniCPM's residual and logit scales); nothing when the scale is 1."""
        if scale == 1.0:
            return x
        const = f"scale_{len(self.inits)}"
        self.inits.append(helper.make_tensor(const, TensorProto.FLOAT, [], [scale]))
        return self.node("Mul", [x, const], [f"{x}_scaled"])

    def span(self, names: tuple[str, ...], shape_of=None) -> TensorProto | None:
        """One initializer over tensors stored back to back, concatenated along their first
        axis (`shape_of(shape)`: the shape to give it); None if they are not stored so (a size
        that is not a multiple of the 64-byte alignment leaves padding between them)."""
        infos = [self.tensors.get(n) for n in names]
        if None in infos:
            return None
        for a, b in zip(infos, infos[1:]):
            if (a["dtype"], a["shape"][1:]) != (b["dtype"], b["shape"][1:]) or \
                    b["offset"] != a["offset"] + _nbytes(a):
                return None
        shape = [sum(i["shape"][0] for i in infos), *infos[0]["shape"][1:]]
        return external_tensor("+".join(names), {**infos[0], "shape": shape}, self.file_name,
                               shape_of(shape) if shape_of else None)

    def matmul(self, x: str, linears: tuple[str, ...], out: str,
               biases: tuple[str, ...] | None = None) -> str | None:
        """x @ W.T with W in MatMulNBits layout (qweight [N, blocks, blob], scales [N*blocks]);
        several linears (FUSED_LINEARS) as one, their N concatenated, when their parts are
        stored side by side (else None, and nothing is added)."""
        part = lambda p: tuple(f"{linear}.{p}" for linear in linears)  # noqa: E731
        qweight = self.span(part("qweight"))
        scales = self.span(part("scales"), lambda shape: [shape[0] * shape[1]])
        asymmetric = f"{linears[0]}.zero_points" in self.tensors  # packed zero points
        zero_points = self.span(part("zero_points")) if asymmetric else None
        bias = self.span(biases) if biases else None
        missing = qweight is None or scales is None or (asymmetric and zero_points is None)
        if missing or (biases and bias is None):
            return None
        inputs = [qweight, scales] + ([zero_points] if asymmetric else [])
        if bias is not None:
            inputs += [None] * (4 - len(inputs)) + [bias]  # (zero_points), g_idx
        self.inits += [t for t in inputs if t is not None]
        return self.node("MatMulNBits", [x, *(t.name if t else "" for t in inputs)], [out],
                         domain=MS, K=self.in_features[linears[0]], N=qweight.dims[0],
                         bits=self.scheme["bits"], block_size=self.scheme["group_size"],
                         accuracy_level=self.accuracy_level)

    def split(self, x: str, sizes: list[int], outs: list[str]) -> list[str]:
        const = f"{x}_split"
        self.inits.append(helper.make_tensor(const, TensorProto.INT64, [len(sizes)], sizes))
        self.node("Split", [x, const], outs, axis=-1)
        return outs


def _nbytes(info: dict) -> int:
    return int(np.prod(info["shape"], dtype=np.int64)) * _ITEMSIZE[info["dtype"]]


def _value(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _save(graph_nodes, inits, inputs, outputs, path: Path, name: str):
    graph = helper.make_graph(graph_nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(MS, 1)])
    model.ir_version = 9
    onnx.save(model, str(path))


def _in_features(cfg: ModelConfig) -> dict[str, int]:
    d, q = cfg.hidden_size, cfg.num_heads * cfg.head_dim
    return {"attn_q": d, "attn_k": d, "attn_v": d, "attn_out": q, "ffn_gate": d, "ffn_up": d,
            "ffn_down": cfg.intermediate_size, "lm_head": d}


def _head_norm(g: _GraphBuilder, x: str, norm: str, heads: int, cfg: ModelConfig) -> str:
    """RMSNorm over each head of x [b, n, heads * head_dim] (Qwen3's and Gemma 3's q/k norms)."""
    shape = f"{norm}_shape"
    g.inits += [helper.make_tensor(f"{shape}_heads", TensorProto.INT64, [4],
                                   [0, 0, heads, cfg.head_dim]),
                helper.make_tensor(f"{shape}_flat", TensorProto.INT64, [3],
                                   [0, 0, heads * cfg.head_dim])]
    per_head = g.node("Reshape", [x, f"{shape}_heads"], [f"{x}_heads"])
    normed = g.node("SimplifiedLayerNormalization", [per_head, g.weight(norm)],
                    [f"{x}_normed"], epsilon=cfg.norm_eps, axis=-1)
    return g.node("Reshape", [normed, f"{shape}_flat"], [f"{x}_n"])


def _branch_out(g: _GraphBuilder, y: str, norm: str, cfg: ModelConfig) -> str:
    """A branch's output as added to the residual: normed first with post_norms (Gemma), times
    MiniCPM's residual scale."""
    if cfg.post_norms:
        y = g.node("SimplifiedLayerNormalization", [y, g.weight(norm)], [f"{y}_normed"],
                   epsilon=cfg.norm_eps, axis=-1)
    return g.scaled(y, cfg.residual_scale)


def _gated(g: _GraphBuilder, gate: str, up: str, cfg: ModelConfig) -> str:
    if cfg.hidden_act == "gelu_tanh":  # FastGelu is the tanh approximation
        act = g.node("FastGelu", [gate], ["gate_act"], domain=MS)
    else:  # silu
        g.node("Sigmoid", [gate], ["gate_sig"])
        act = g.node("Mul", [gate, "gate_sig"], ["gate_act"])
    return g.node("Mul", [act, up], ["act"])


def _qkv(g: _GraphBuilder, x: str, cfg: ModelConfig) -> tuple[str, str, str]:
    """q, k, v of x by one matmul over the three linears, stored side by side (FUSED_LINEARS);
    GroupQueryAttention takes them packed in one tensor as q (k and v empty) unless q and k are
    normed first."""
    names = ("attn_q", "attn_k", "attn_v")
    biases = tuple(f"{n}_bias" for n in names) if cfg.qkv_bias else None
    if g.matmul(x, names, "qkv", biases):
        if not cfg.qk_norm:
            return "qkv", "", ""
        kv = cfg.num_kv_heads * cfg.head_dim
        return tuple(g.split("qkv", [cfg.num_heads * cfg.head_dim, kv, kv], ["q", "k", "v"]))
    return tuple(g.matmul(x, (n,), n[-1], (b,) if b else None)  # (padding between them)
                 for n, b in zip(names, biases or (None,) * 3))


def _attention_attrs(cfg: ModelConfig, layer: int) -> dict:
    attrs = {"num_heads": cfg.num_heads, "kv_num_heads": cfg.num_kv_heads, "do_rotary": 1,
             "rotary_interleaved": 0}
    if cfg.attn_scale is not None:
        attrs["scale"] = cfg.attn_scale
    window = cfg.window(layer)
    if window is not None:  # the same keys as transformers: distance < window (measured)
        attrs["local_window_size"] = window
    return attrs


def layer_graph(path: Path, cfg: ModelConfig, layer: int, file_name: str, tensors: dict,
                scheme: dict, kv_cache_len: int, hidden_type: str,
                accuracy_level: int = 4) -> None:
    g = _GraphBuilder(tensors, file_name, scheme, accuracy_level)
    g.in_features = _in_features(cfg)
    x = g.node("SimplifiedLayerNormalization", ["hidden", g.weight("attn_norm")], ["x"],
               epsilon=cfg.norm_eps, axis=-1)
    q, k, v = _qkv(g, x, cfg)
    if cfg.qk_norm:
        q = _head_norm(g, q, "attn_q_norm", cfg.num_heads, cfg)
        k = _head_norm(g, k, "attn_k_norm", cfg.num_kv_heads, cfg)
    cos, sin = rope_tables(cfg.layer_rope(layer), np.arange(kv_cache_len), kv_cache_len)
    g.inits += [helper.make_tensor("cos_cache", TensorProto.FLOAT, cos.shape, cos.ravel()),
                helper.make_tensor("sin_cache", TensorProto.FLOAT, sin.shape, sin.ravel())]
    attn = g.node("GroupQueryAttention",
                  [q, k, v, "past_key", "past_value", "seqlens_k", "total_seq_len",
                   "cos_cache", "sin_cache"],
                  ["attn", "present_key", "present_value"], domain=MS,
                  **_attention_attrs(cfg, layer))
    o = _branch_out(g, g.matmul(attn, ("attn_out",), "o"), "attn_post_norm", cfg)
    g.node("SkipSimplifiedLayerNormalization", [o, "hidden", g.weight("ffn_norm")],
           ["x2", "", "", "h2"], domain=MS, epsilon=cfg.norm_eps)
    if g.matmul("x2", ("ffn_gate", "ffn_up"), "gate_up"):
        gate, up = g.split("gate_up", [cfg.intermediate_size] * 2, ["gate", "up"])
    else:  # (not stored side by side: padding between them)
        gate, up = g.matmul("x2", ("ffn_gate",), "gate"), g.matmul("x2", ("ffn_up",), "up")
    act = _gated(g, gate, up, cfg)
    down = _branch_out(g, g.matmul(act, ("ffn_down",), "down"), "ffn_post_norm", cfg)
    out = "hidden_out"
    if hidden_type == "bf16":  # the hidden state handed to the next layer is bf16, as the vendor's
        g.node("Add", ["h2", down], ["h_sum"])
        g.node("Cast", ["h_sum"], ["h_bf16"], to=TensorProto.BFLOAT16)
        g.node("Cast", ["h_bf16"], [out], to=TensorProto.FLOAT)
    else:
        g.node("Add", ["h2", down], [out])
    cache = ["b", cfg.num_kv_heads, kv_cache_len, cfg.head_dim]
    f = TensorProto.FLOAT
    inputs = [_value("hidden", f, ["b", "n", cfg.hidden_size]), _value("past_key", f, cache),
              _value("past_value", f, cache), _value("seqlens_k", TensorProto.INT32, ["b"]),
              _value("total_seq_len", TensorProto.INT32, [])]
    outputs = [_value(out, f, ["b", "n", cfg.hidden_size]), _value("present_key", f, cache),
               _value("present_value", f, cache)]
    _save(g.nodes, g.inits, inputs, outputs, path, path.stem)


def post_graph(path: Path, cfg: ModelConfig, file_name: str, tensors: dict, scheme: dict,
               accuracy_level: int = 4) -> None:
    """hidden [b, n, D] -> logits [b, n, vocab]: final RMSNorm + lm_head."""
    g = _GraphBuilder(tensors, file_name, scheme, accuracy_level)
    g.in_features = _in_features(cfg)
    x = g.node("SimplifiedLayerNormalization", ["hidden", g.weight("output_norm")], ["x"],
               epsilon=cfg.norm_eps, axis=-1)
    g.matmul(g.scaled(x, cfg.logit_scale), ("lm_head",), "logits")
    f = TensorProto.FLOAT
    _save(g.nodes, g.inits, [_value("hidden", f, ["b", "n", cfg.hidden_size])],
          [_value("logits", f, ["b", "n", cfg.vocab_size])], path, path.stem)


CACHE_IO = ("past_key", "past_value", "present_key", "present_value")


def with_context(model: onnx.ModelProto, cfg: ModelConfig, layer: int, context: int) -> None:
    """A layer graph, as layer_graph made it, changed in place for a KV cache of `context`
    positions: the cache's declared length and the rotary tables, computed again for that
    context (longrope picks its factors by it), as layer_graph would have made them."""
    g = model.graph
    cache = [v for v in [*g.input, *g.output] if v.name in CACHE_IO]
    tables = {t.name: t for t in g.initializer if t.name in ("cos_cache", "sin_cache")}
    if len(cache) != len(CACHE_IO) or len(tables) != 2:
        raise ValueError(f"{g.name}: not a layer graph with a KV cache and rotary tables")
    for v in cache:
        v.type.tensor_type.shape.dim[2].dim_value = context
    cos, sin = rope_tables(cfg.layer_rope(layer), np.arange(context), context)
    for name, values in (("cos_cache", cos), ("sin_cache", sin)):
        tables[name].CopyFrom(helper.make_tensor(name, TensorProto.FLOAT, values.shape,
                                                 values.ravel()))


K_SCALE_INPUT = 12  # GroupQueryAttention's inputs: ..., head_sink, k_scale, v_scale, ...


def with_int8_cache(model: onnx.ModelProto, k_scale: np.ndarray, v_scale: np.ndarray) -> None:
    """A layer graph changed in place to hold its KV cache as int8 (runtime.kv_quant): the
    cache's inputs and outputs declared int8, GroupQueryAttention told to quantize per channel
    with these scales ([kv_heads, head_dim] each)."""
    g = model.graph
    cache = [v for v in [*g.input, *g.output] if v.name in CACHE_IO]
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if len(cache) != len(CACHE_IO) or len(attention) != 1:
        raise ValueError(f"{g.name}: not a layer graph with a KV cache and one attention")
    for v in cache:
        v.type.tensor_type.elem_type = TensorProto.INT8
    node = attention[0]
    if len(node.input) > K_SCALE_INPUT:
        raise ValueError(f"{g.name}: its attention has inputs past head_sink already")
    node.input.extend([""] * (K_SCALE_INPUT - len(node.input)) + ["kv_k_scale", "kv_v_scale"])
    node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                           helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                           helper.make_attribute("kv_cache_bit_width", 8)])
    for name, s in (("kv_k_scale", k_scale), ("kv_v_scale", v_scale)):
        s = np.asarray(s, np.float32).reshape(1, *s.shape[-2:-1], 1, s.shape[-1])
        g.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, s.shape, s.ravel()))


def supports(scheme: dict) -> bool:
    return scheme.get("kind") == "int"


def unsupported_shape(cfg: ModelConfig) -> str | None:
    """Why ORT's GroupQueryAttention cannot run this model's attention, or None."""
    half = (cfg.rotary_dim or cfg.head_dim) // 2
    if half % 8:
        return (f"rotary dimension {2 * half} (GroupQueryAttention needs a multiple of 16)")
    return None


__all__ = ["layer_graph", "post_graph", "supports", "with_context", "with_int8_cache",
           "LAYER_LINEARS"]
