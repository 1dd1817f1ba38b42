"""The tokenizer, special tokens and chat template of a source, ready to store in the artifact."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from edgellm.compiler.gguf_tokenizer import tokenizer_json_from_gguf
from edgellm.errors import EdgeLLMError

# Texts of tokens that end a turn in common chat formats; like llama.cpp, any of them that is a
# special token of the vocabulary stops generation, besides the declared eos id(s).
END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>",
                     "<|eom_id|>", "<end_of_turn>", "</s>")


@dataclass
class TokenizerInfo:
    tokenizer_json: str = field(repr=False)
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    chat_template: str | None

    def manifest_entry(self, file_name: str) -> dict:
        d = asdict(self)
        del d["tokenizer_json"]
        return {"file": file_name, **d}


def _end_of_turn_ids(tok: Tokenizer, declared: list[int]) -> list[int]:
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    found = [tok.token_to_id(t) for t in END_OF_TURN_TEXTS]
    ids = list(dict.fromkeys([*declared, *(i for i in found if i in special)]))
    return [i for i in ids if i is not None]


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised by older transformers
        return value.get("content")
    return value


def _chat_template_of(directory: Path, tok_cfg: dict) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default") or next(iter(named.values()))
    if template is None and (directory / "chat_template.json").is_file():
        template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    return template


def from_hf_dir(directory: Path, hf_config: dict) -> TokenizerInfo:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise EdgeLLMError(f"{directory}: no tokenizer.json (a fast tokenizer file is required)")
    text = path.read_text()
    tok = Tokenizer.from_str(text)
    cfg_path = directory / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    gen_path = directory / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}

    bos_token, eos_token = _token_text(tok_cfg.get("bos_token")), _token_text(tok_cfg.get("eos_token"))
    declared = gen.get("eos_token_id", hf_config.get("eos_token_id"))
    declared = declared if isinstance(declared, list) else [declared] if declared is not None else []
    if eos_token is not None and tok.token_to_id(eos_token) is not None:
        declared.append(tok.token_to_id(eos_token))
    bos_id = tok.token_to_id(bos_token) if bos_token else hf_config.get("bos_token_id")
    pad = _token_text(tok_cfg.get("pad_token"))
    return TokenizerInfo(
        tokenizer_json=text,
        bos_id=bos_id,
        eos_ids=_end_of_turn_ids(tok, declared),
        pad_id=tok.token_to_id(pad) if pad else None,
        bos_token=bos_token,
        eos_token=eos_token,
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        chat_template=_chat_template_of(directory, tok_cfg),
    )


def from_gguf_metadata(reader, meta: dict) -> TokenizerInfo:
    fields = reader.fields
    tok_meta = dict(meta)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.scores"):
        if key in fields:
            tok_meta[key] = fields[key].contents()
    if "tokenizer.ggml.tokens" not in tok_meta:
        raise EdgeLLMError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    text = tokenizer_json_from_gguf(tok_meta)
    tok = Tokenizer.from_str(text)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    declared = [i for i in (eos_id, meta.get("tokenizer.ggml.eot_token_id"),
                            meta.get("tokenizer.ggml.eom_token_id")) if i is not None]
    return TokenizerInfo(
        tokenizer_json=text,
        bos_id=bos_id,
        eos_ids=_end_of_turn_ids(tok, [int(i) for i in declared]),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        bos_token=tok.id_to_token(bos_id) if bos_id is not None else None,
        eos_token=tok.id_to_token(eos_id) if eos_id is not None else None,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
