"""Build a Hugging Face `tokenizer.json` from a GGUF file's tokenizer metadata.

Byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`) are stored in GGUF exactly as in
tokenizer.json (byte-alphabet strings and "a b" merges); what GGUF names only by a label
(`tokenizer.ggml.pre`) is the pre-tokenizer, which is rebuilt here from the same regexes the
models' own tokenizer.json files use.

SentencePiece BPE vocabularies (`tokenizer.ggml.model = llama`: Llama-2, TinyLlama, Phi-3,
MiniCPM) carry pieces and scores but no merges; as transformers' converter does, the merges are
every split of a piece into two pieces of the vocabulary, ordered by the merged piece's score,
in a BPE model with byte fallback behind the "▁" space normalizer of those models' tokenizer.json.
"""

from __future__ import annotations

import json

from edgellm.errors import EdgeLLMError

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(regex: str, normalizer: dict | None = None) -> tuple[dict | None, dict]:
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    ]}
    return normalizer, pre


def _digits_then_gpt2() -> tuple[None, dict]:
    return None, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}


def _gpt2() -> tuple[None, dict]:
    return None, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}


# tokenizer.ggml.pre -> (normalizer, pre_tokenizer) of the model's own tokenizer.json
PRE_TOKENIZERS = {
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT, {"type": "NFC"}),
    "deepseek-r1-qwen": lambda: _split_then_bytes(_QWEN2_SPLIT, {"type": "NFC"}),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "smollm": _digits_then_gpt2,
    "gpt-2": _gpt2,
    "default": _gpt2,
}

# Llama-3's tokenizer.json looks whole words up in the vocab before applying merges.
IGNORE_MERGES = {"llama-bpe", "llama3"}

UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict]:
    return [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": typ in (CONTROL, UNKNOWN)}
        for i, (tok, typ) in enumerate(zip(tokens, types))
        if typ in (UNKNOWN, CONTROL, USER_DEFINED)
    ]


def _spm_merges(tokens: list[str], scores: list[float]) -> list[list[str]]:
    """Merges of a SentencePiece BPE vocabulary: each piece's splits into two vocabulary pieces,
    pieces by descending score (ties by id), splits by the ids of their halves."""
    ids = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], i)):
        piece = tokens[i]
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in ids and piece[k:] in ids]
        merges.extend(sorted(splits, key=lambda lr: (ids[lr[0]], ids[lr[1]])))
    return [list(m) for m in merges]


def _bos_processor(tokens: list[str], meta: dict) -> dict | None:
    """The tokenizer's own specials: BOS before a text when the GGUF says add_bos_token (as
    llama.cpp tokenizes a raw prompt); chat templates write it themselves."""
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if not meta.get("tokenizer.ggml.add_bos_token") or bos is None:
        return None
    text = tokens[int(bos)]
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [int(bos)], "tokens": [text]}}}


def _bpe_tokenizer_json(tokens: list[str], types: list[int], merges: list[list[str]],
                        normalizer, pre_tokenizer, decoder, meta: dict, **model) -> str:
    """tokenizer.json of a BPE model over the GGUF vocabulary; `model` sets the BPE options."""
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added_tokens(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _bos_processor(tokens, meta),
        "decoder": decoder,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, **model,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,
        },
    }
    return json.dumps(doc, ensure_ascii=False)


def _spm_tokenizer_json(tokens: list[str], types: list[int], meta: dict) -> str:
    scores = [float(x) for x in meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    # SentencePiece's add_dummy_prefix: a space before the text, stripped again when decoding
    # (Llama-2, Phi-3: on; Gemma: off)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True) is not False
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    normalizer = ({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, replace]} if prefix else replace)
    decoder = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]
        + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])}
    return _bpe_tokenizer_json(tokens, types, _spm_merges(tokens, scores), normalizer, None,
                               decoder, meta, unk_token=tokens[unk] if unk is not None else None,
                               fuse_unk=True, byte_fallback=True)


def tokenizer_json_from_gguf(meta: dict) -> str:
    """The tokenizer.json text for a GGUF's `tokenizer.ggml.*` metadata."""
    model = meta.get("tokenizer.ggml.model")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if model == "llama":
        return _spm_tokenizer_json(tokens, types, meta)
    if model != "gpt2":
        raise EdgeLLMError(
            f"GGUF tokenizer model {model!r} is not supported yet (supported: byte-level BPE "
            f"'gpt2', SentencePiece BPE 'llama'); a Hugging Face directory of the model works")
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    if pre_name not in PRE_TOKENIZERS:
        raise EdgeLLMError(
            f"GGUF pre-tokenizer {pre_name!r} is not known; supported: {', '.join(PRE_TOKENIZERS)}"
        )
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre_name]()
    merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
               "use_regex": True}
    return _bpe_tokenizer_json(tokens, types, merges, normalizer, pre_tokenizer, decoder, meta,
                               ignore_merges=pre_name in IGNORE_MERGES)
