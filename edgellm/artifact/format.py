"""Artifact format constants and the manifest (see docs/FORMAT.md)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.fileutil import read_json

FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (2, 3)  # v2 lacks v3's config fields, whose defaults are v2's meaning
MANIFEST_NAME = "manifest.json"
EMBED_FILE = "model.embed_tokens.weight.bfloat16.bin"
TOKENIZER_FILE = "tokenizer.json"
POST_FILE = "post.bin"
POST_GRAPH = "post.onnx"
ALIGNMENT = 64  # byte alignment of every tensor inside a weight file


def layer_file(index: int) -> str:
    return f"layer_{index:03d}.bin"


@dataclass
class Manifest:
    """Everything the runtime needs to know about an artifact; written as manifest.json."""

    format_version: int
    producer: str
    config: dict  # ModelConfig.to_dict()
    weight_scheme: dict  # quantization of the decoder layers' linears, every parameter
    post_scheme: dict  # quantization of the lm_head in the post part
    kv_cache_len: int
    prefill_len: int
    hidden_state_type: str
    tokenizer: dict  # file, bos_id, eos_ids, pad_id, add_bos, chat_template
    source: dict
    embedding: dict  # file, dtype, shape
    layers: list[str]
    post: str
    graphs: dict  # ONNX Runtime graphs: engine, layers, post ({} when there are none)
    files: dict[str, dict] = field(default_factory=dict)  # name -> size, sha256, tensors
    # layer file -> its scheme where it differs from weight_scheme (mixed precision, --keep-s8)
    layer_schemes: dict[str, dict] = field(default_factory=dict)
    # how integer weights were chosen: {"method": "rtn"} or GPTQ with its calibration
    quantization: dict = field(default_factory=dict)
    # the board the layout was chosen for (`build --target`): {"board": "rpi4"}, or {}
    target: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise EdgeLLMError(f"{directory} is not an edgellm artifact: no {MANIFEST_NAME}")
        data = read_json(path)
        version = data.get("format_version") if isinstance(data, dict) else None
        if version not in SUPPORTED_VERSIONS:
            raise EdgeLLMError(
                f"{path}: artifact format version {version!r} is not supported by this edgellm "
                f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); rebuild the artifact"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls)
                    if f.default_factory is not dataclasses.MISSING}  # added within version 3
        missing = names - data.keys() - optional
        if missing:
            raise EdgeLLMError(f"{path} lacks the fields {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in names})
