"""Session fixtures: real models pulled from PyPI (cached by `edgellm pull`) and built once."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

LLAMA_CPP_SDIST = ("llama-cpp-python", "0.3.36")  # carries llama.cpp's vocab-only test GGUFs


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    from edgellm.hub.pull import pull

    return pull("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def qwen15_gguf() -> Path:
    from edgellm.hub.pull import pull

    return pull("qwen2.5-coder-1.5b-instruct")


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from edgellm.hub.pull import pull

    return pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    from edgellm.hub.pull import pull

    return pull("gemma-3-270m")


def _build(src: Path, out: Path) -> Path:
    from edgellm.compiler import BuildOptions, build

    return build(src, out, BuildOptions(kv_cache_len=512, weight_type="s8"))


@pytest.fixture(scope="session")
def qwen_s8(qwen_gguf, tmp_path_factory) -> Path:
    return _build(qwen_gguf, tmp_path_factory.mktemp("qwen") / "qwen-s8")


@pytest.fixture(scope="session")
def qwen15_s8(qwen15_gguf, tmp_path_factory) -> Path:
    return _build(qwen15_gguf, tmp_path_factory.mktemp("qwen15") / "qwen15-s8")


@pytest.fixture(scope="session")
def smol_s8(smol_gguf, tmp_path_factory) -> Path:
    return _build(smol_gguf, tmp_path_factory.mktemp("smol") / "smol-s8")


@pytest.fixture(scope="session")
def gemma_s8(gemma_gguf, tmp_path_factory) -> Path:
    return _build(gemma_gguf, tmp_path_factory.mktemp("gemma") / "gemma-s8")


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """llama.cpp's vocab GGUFs with the HF tokenizers' expected ids (.inp/.out), cached."""
    import subprocess

    from edgellm.hub.pull import cache_dir

    target = cache_dir() / "test-vocab" / f"llama.cpp-models-{LLAMA_CPP_SDIST[1]}"
    if not (target / "ggml-vocab-qwen2.gguf.out").is_file():
        target.mkdir(parents=True, exist_ok=True)
        dl = target.parent / "sdist"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "-q", "-d", str(dl), "%s==%s" % LLAMA_CPP_SDIST], check=True)
        (sdist,) = dl.glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{LLAMA_CPP_SDIST[1]}/vendor/llama.cpp/models/ggml-vocab-"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                if member.name.startswith(prefix) and member.isfile():
                    member.name = Path(member.name).name
                    tar.extract(member, target, filter="data")
        sdist.unlink()
    return target
