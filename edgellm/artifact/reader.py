"""Open an artifact: check its manifest and files, and map its tensors without copying."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.arch.spec import ModelConfig
from edgellm.artifact.format import MANIFEST_NAME, Manifest
from edgellm.errors import EdgeLLMError
from edgellm.fileutil import sample_sha256, sha256_file
from edgellm.quant.schemes import scheme_from_dict

NUMPY_DTYPES = {"uint8": np.uint8, "int8": np.int8, "bf16": np.uint16, "fp16": np.float16,
                "fp32": np.float32}


@dataclass
class Artifact:
    """A checked artifact directory; tensors come back as read-only views of mmapped files."""

    path: Path
    manifest: Manifest
    config: ModelConfig

    @property
    def weight_scheme(self):
        return scheme_from_dict(self.manifest.weight_scheme)

    def layer_scheme(self, layer_file: str):
        """The scheme of one decoder layer's file (mixed-precision builds differ per layer)."""
        override = self.manifest.layer_schemes.get(layer_file)
        return scheme_from_dict(override) if override else self.weight_scheme

    @property
    def post_scheme(self):
        return scheme_from_dict(self.manifest.post_scheme)

    def tensors(self, file_name: str) -> dict[str, np.ndarray]:
        """All tensors of one weight file, by name."""
        mapped = np.memmap(self.path / file_name, dtype=np.uint8, mode="r")
        out = {}
        for name, t in self.manifest.files[file_name]["tensors"].items():
            dtype = np.dtype(NUMPY_DTYPES[t["dtype"]])
            count = int(np.prod(t["shape"], dtype=np.int64))
            view = mapped[t["offset"]:t["offset"] + count * dtype.itemsize]
            out[name] = view.view(dtype).reshape(t["shape"])
        return out

    def embedding(self) -> np.ndarray:
        """The bf16 embedding table as uint16 bit patterns, [vocab, hidden], mmapped."""
        e = self.manifest.embedding
        return np.memmap(self.path / e["file"], dtype=np.uint16, mode="r", shape=tuple(e["shape"]))


def load_artifact(path: str | Path, verify: bool = False) -> Artifact:
    """Read and check an artifact; `verify` also compares every file's sha256."""
    path = Path(path)
    _refuse_a_source(path)
    if not path.is_dir():
        raise EdgeLLMError(f"artifact directory {path} does not exist")
    manifest = Manifest.read(path)
    for name, info in manifest.files.items():
        f = path / name
        if not f.is_file():
            raise EdgeLLMError(f"artifact file {f} is missing")
        if f.stat().st_size != info["size"]:
            raise EdgeLLMError(
                f"artifact file {f} has {f.stat().st_size} bytes, the manifest says {info['size']}"
            )
        sampled = info.get("sample_sha256")  # artifacts built before 2026-12-01 have none
        if (verify and sha256_file(f) != info["sha256"]) or \
                (sampled and sample_sha256(f) != sampled):
            raise EdgeLLMError(f"artifact file {f} does not match its sha256 in the manifest: "
                               f"the artifact is damaged; rebuild it (or restore the file)")
    try:
        config = ModelConfig.from_dict(manifest.config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EdgeLLMError(f"{path / MANIFEST_NAME}: the model config in it is incomplete or "
                           f"wrong ({type(e).__name__}: {e}); rebuild the artifact") from None
    return Artifact(path, manifest, config)


def _refuse_a_source(path: Path):
    """A model file or directory given where an artifact belongs: say how to build one."""
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EdgeLLMError(f"{path} is a file; an artifact is a directory made by "
                                   f"edgellm build")
        kind = "a GGUF model file"
    elif (path / "config.json").is_file() and not (path / MANIFEST_NAME).exists():
        kind = "a Hugging Face model directory"
    else:
        return
    raise EdgeLLMError(f"{path} is {kind} (a source), not an edgellm artifact; compile it first: "
                       f"edgellm build {path} -o {path.stem or path.name}-s8")
