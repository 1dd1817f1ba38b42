"""A human-readable summary of an artifact (`edgellm inspect`)."""

from __future__ import annotations

from edgellm.artifact.reader import Artifact


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _files(m) -> list[str]:
    """The files summed by kind: a layer's weights and graphs, the rest one by one."""
    kinds: dict[str, list[int]] = {}
    for name, f in m.files.items():
        kind = ("layer weights" if name.startswith("layer_") and name.endswith(".bin") else
                "layer graphs" if name.startswith("layer_") and name.endswith(".onnx") else name)
        kinds.setdefault(kind, []).append(f["size"])
    return [f"  {kind:42s} {_mb(sum(sizes)):>12s}" + (f"  ({len(sizes)} files)"
                                                       if len(sizes) > 1 else "")
            for kind, sizes in kinds.items()]


def describe(art: Artifact, files: bool = False) -> str:
    """The summary; `files`: every file with its size and checksum instead of their kinds."""
    m, c = art.manifest, art.config
    ws, ps = m.weight_scheme, m.post_scheme
    group = lambda s: (f" (group {s['group_size']}" + ("" if s.get("symmetric", True)  # noqa: E731
                                                       else ", asymmetric") + ")"
                       if s.get("kind") == "int" else "")
    tok = m.tokenizer
    total = sum(f["size"] for f in m.files.values())
    lines = [
        f"artifact        {art.path}",
        f"format          v{m.format_version}, {m.producer}",
        f"architecture    {c.arch}: {c.num_layers} layers, hidden {c.hidden_size}, "
        f"ffn {c.intermediate_size}, heads {c.num_heads}/{c.num_kv_heads} (q/kv), "
        f"head_dim {c.head_dim}, vocab {c.vocab_size}",
        f"rope            theta {c.rope_theta:g}, scaling {c.rope_scaling or 'none'}",
        f"weights         {ws['name']}{group(ws)}; lm_head {ps['name']}{group(ps)}; "
        f"tied embeddings: {c.tie_word_embeddings}",
        f"quantized by    {_method(m.quantization)}",
        f"hidden state    {m.hidden_state_type}; kv_cache_len {m.kv_cache_len}; "
        f"prefill_len {m.prefill_len}",
        f"tokens          bos {tok['bos_id']}, eos {tok['eos_ids']}, pad {tok['pad_id']}; "
        f"chat template: {'yes' if tok.get('chat_template') else 'no'}",
        f"source          {m.source.get('kind')}: {m.source.get('path')}",
        *([f"built for       {_board(m.target['board'])} (build --target "
           f"{m.target['board']})"] if m.target.get("board") else []),
        f"files           {len(m.files)}, {_mb(total)} in all"
        + (":" if files else " (--files lists each with its checksum):"),
    ]
    if not files:
        return "\n".join(lines + _files(m))
    for name, f in m.files.items():
        lines.append(f"  {name:42s} {_mb(f['size']):>12s}  sha256 {f['sha256'][:16]}…")
    return "\n".join(lines)


def _board(name: str) -> str:
    from edgellm.boards import BOARDS

    board = BOARDS.get(name)
    return board.note if board else name


def _method(quantization: dict) -> str:
    if quantization.get("method") == "gptq":
        text = quantization["calibration_text"]
        text = "edgellm's built-in text" if text == "built-in" else text
        return f"GPTQ, {quantization['calibration_tokens']} calibration tokens of {text}"
    return "round to nearest"


def layout_label(weights: dict, post: dict, mixed: bool = False) -> str:
    """'s8', 's4 g32 asym, s8 lm_head', ...: a build's weight layout, from its scheme dicts."""
    def one(d):
        if d.get("kind") != "int":
            return d["name"]
        group = f" g{d['group_size']}" if d["bits"] < 8 or d["group_size"] != 128 else ""
        return d["name"] + group + ("" if d.get("symmetric", True) else " asym")
    label = one(weights) + (" mixed (some layers s8)" if mixed else "")
    return label + ("" if post["name"] == weights["name"] else f", {post['name']} lm_head")
