"""The runtime knows its CPU (issue 17): features from /proc/cpuinfo, which weight types ONNX
Runtime runs with a kernel there, and no silent per-call dequantizing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgellm.runtime.cpu import Cpu, matmul_path, read_cpu
from helpers import edgellm, make_tiny_model

ARM = """processor\t: 0
BogoMIPS\t: 48.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm {dp}
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: {part}
CPU revision\t: 0
"""
X86 = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


@pytest.mark.parametrize("part,dp,name", [("0xd03", "", "cortex-a53"),
                                          ("0xd05", "asimddp", "cortex-a55"),
                                          ("0xd0b", "asimddp lrcpc", "cortex-a76"),
                                          ("0xd08", "", "cortex-a72")])
def test_arm_cores_and_their_dotprod_are_read(part, dp, name):
    cpu = read_cpu(ARM.format(part=part, dp=dp), machine="aarch64")
    assert cpu.name == name and cpu.dotprod == bool(dp)
    path, why = matmul_path(cpu, 8, 4, "1.32.0")
    assert path == ("kernel" if dp else "qgemm"), why
    assert matmul_path(cpu, 4, 4, "1.32.0")[0] == "kernel"
    # no 8-bit MatMulNBits on aarch64 before 1.23: re-laid for QGEMM, whatever the core
    assert matmul_path(cpu, 8, 4, "1.22.0")[0] == "qgemm"
    assert matmul_path(cpu, 8, 0, "1.32.0")[0] == ("dequantize" if dp else "qgemm")


def test_x86_is_read_and_8_bit_needs_accuracy_level_4():
    cpu = read_cpu(X86, machine="x86_64")
    assert cpu.name == "AMD EPYC 9B14" and "avx512_vnni" in cpu.features
    assert matmul_path(cpu, 8, 4, "1.32.0")[0] == "kernel"
    assert matmul_path(cpu, 8, 0, "1.32.0")[0] == "dequantize"
    assert matmul_path(cpu, 4, 0, "1.32.0")[0] == "kernel"
    assert read_cpu("", machine="aarch64").name == "unknown arm core"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu")
    make_tiny_model(tmp / "hf", "qwen2", tied=False)
    out = {}
    for weights, level in (("s8", 4), ("s8", 0), ("s4", 0), ("s4", 4)):
        art = tmp / f"{weights}-{level}"
        done = edgellm("build", tmp / "hf", "-o", art, "--weight-type", weights,
                       "--post-weight-type", weights, "--accuracy-level", str(level),
                       "--kv-cache-len", "32")
        assert done.returncode == 0, done.stderr
        out[weights, level] = art
    return out


RUN_VERBOSE = """
import sys
import onnxruntime as ort
ort.set_default_logger_severity(0)  # INFO: where ORT says it falls back
from edgellm.runtime.generator import Generator
Generator.load(sys.argv[1], threads=1, allow_slow_kernels=True,
               kernel="matmulnbits").engine.forward([1, 2, 3], 0)
"""


@pytest.mark.parametrize("key", [("s8", 4), ("s8", 0), ("s4", 0), ("s4", 4)])
def test_the_prediction_agrees_with_onnx_runtime_here(builds, key):
    """ORT's own INFO line 'Falling back to using unpacked compute mode' appears exactly where
    runtime.cpu predicts the dequantizing path for this machine's CPU."""
    import onnxruntime

    done = subprocess.run([sys.executable, "-c", RUN_VERBOSE, str(builds[key])],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    fell_back = "Falling back to using unpacked compute mode" in done.stderr
    predicted = matmul_path(read_cpu(), 8 if key[0] == "s8" else 4, key[1],
                            onnxruntime.__version__)[0]
    assert fell_back == (predicted == "dequantize"), (key, predicted)


def test_where_ort_would_dequantize_the_integer_gemm_runs_it_and_forcing_it_is_refused(builds):
    """An s8 artifact built at accuracy level 0 (no 8-bit MatMulNBits kernel): the weights run
    on the integer GEMM instead (runtime.kernels), and forcing MatMulNBits is a one-line error
    with the fix, or a warning with --allow-slow-kernels."""
    done = edgellm("run", builds["s8", 0], "-p", "hi", "--max-new-tokens", "2", "--json")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    done = edgellm("run", builds["s8", 0], "-p", "hi", "--max-new-tokens", "2",
                   "--kernel", "matmulnbits")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "accuracy level 4" in done.stderr and "--allow-slow-kernels" in done.stderr
    done = edgellm("run", builds["s8", 0], "-p", "hi", "--max-new-tokens", "2",
                   "--kernel", "matmulnbits", "--allow-slow-kernels")
    assert done.returncode == 0 and "edgellm: warning: onnxruntime" in done.stderr


def test_a53_runs_s8_on_qgemm_and_it_agrees_with_the_reference(builds, monkeypatch):
    """No dotprod: every 8-bit graph is re-laid for ORT's integer GEMM at load, at either
    accuracy level, and computes what the numpy reference computes (within the int8
    activation rounding MatMulNBits' level 4 has too)."""
    import numpy as np

    from edgellm.runtime import cpu as cpu_module
    from edgellm.runtime.generator import Generator

    monkeypatch.setattr(cpu_module, "read_cpu", lambda: Cpu.core("cortex-a53"))
    ref = Generator.load(builds["s8", 4], engine="numpy").engine.forward(
        list(range(3, 19)), 0, all_logits=True)
    from edgellm.fileutil import cache_dir

    for key in (("s8", 4), ("s8", 0)):
        engine = Generator.load(builds[key], threads=1).engine
        assert len(engine.relaid) == len(engine.layers) + 1
        # the re-laid weights reach ORT memory-mapped from unlinked files (inline, ORT kept
        # them beside its packed copy: twice the weights' memory); none is left on disk
        for session in [engine.post, *engine.layers]:
            assert all(isinstance(a, np.memmap) for a in session.edgellm_external.values())
        assert not list((cache_dir() / "tmp").glob("*.qgemm"))
        got = engine.forward(list(range(3, 19)), 0, all_logits=True)
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max(), key
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9, key
    # 4-bit: MatMulNBits has a kernel on every core (fp32 NEON here), so it may be asked for
    s4 = Generator.load(builds["s4", 4], threads=1, kernel="matmulnbits").engine
    assert s4.relaid == set()


def test_plan_says_which_weight_types_have_a_kernel_on_the_board(builds):
    rows = {}
    for board in ("rpi3", "rpi4", "rpi5"):
        out = json.loads(edgellm("plan", builds["s8", 4], "--board", board, "--json").stdout)
        rows[board] = {r["weights"]: r["kernel"] for r in out["rows"]}
    for board in ("rpi3", "rpi4"):  # Cortex-A53, A72: no dotprod
        assert rows[board]["s8"] == "yes (8-bit on QGEMM, re-laid at load)"
        assert rows[board]["s4 g32 asym, s8 lm_head"] == (
            "yes (on QGEMM, re-laid at load; the 4-bit weights as int8 where memory holds twice "
            "their bytes)")
        assert rows[board]["s4 g32 asym"] == "yes"
    assert rows["rpi5"]["s8"] == "yes" and rows["rpi5"]["bf16"] == "numpy engine"


def test_build_target_picks_a_layout_with_kernels_and_checks_a_given_one(builds, tmp_path):
    source = builds["s8", 4].parent / "hf"
    # every board takes s8 when it fits: the A72 without dotprod on QGEMM (edgellm.onnx.qgemm)
    for board, layout in (("rpi4", ("s8", "s8", 128, True)), ("rpi5", ("s8", "s8", 128, True))):
        done = edgellm("build", source, "-o", tmp_path / board, "--target", board,
                       "--kv-cache-len", "32")
        assert done.returncode == 0, done.stderr
        m = json.loads((tmp_path / board / "manifest.json").read_text())
        w = m["weight_scheme"]
        assert (w["name"], m["post_scheme"]["name"], w["group_size"], w["symmetric"]) == layout
        assert m["target"] == {"board": board}
    done = edgellm("build", source, "-o", tmp_path / "bad", "--target", "rpi5",
                   "--weight-type", "s8", "--accuracy-level", "0", "--kv-cache-len", "32")
    assert done.returncode == 1 and "8-bit kernels need accuracy level 4" in done.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("symmetric", [True, False])
def test_qgemm_relayout_keeps_each_weight_within_half_a_channel_step(symmetric):
    """edgellm.onnx.qgemm: the groups' 8-bit weights (zero point 128, or one per group),
    quantized again per output column into int8 [K, N], stand for the same weights to within
    half the column's step; K not a multiple of the group (a padded last group) included."""
    import numpy as np

    from edgellm.onnx.qgemm import per_channel_int8
    from edgellm.quant.schemes import GroupwiseIntScheme

    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 200)).astype(np.float32) * rng.uniform(0.1, 3, size=(48, 1))
    scheme = GroupwiseIntScheme("s8", bits=8, group_size=64, symmetric=symmetric)
    parts = scheme.quantize(w)
    grouped = scheme.dequantize(parts, 200)
    q, col = per_channel_int8(parts["qweight"], parts["scales"].ravel(), 200,
                              parts.get("zero_points"))
    assert q.shape == (200, 48) and q.dtype == np.int8 and col.shape == (48,)
    assert np.all(np.abs(q.T * col[:, None] - grouped) <= col[:, None] / 2 + 1e-6)
    assert np.abs(q).max() == 127


def test_the_axera_boards_give_their_cores_and_ask_for_what_is_unpublished(builds, tmp_path):
    """ax650n / ax630c: the cores are known (A55, A53), the memory specs are not: plan asks
    for --ram and --bandwidth instead of inventing them; build --target chooses by the cores."""
    done = edgellm("plan", builds["s8", 4], "--board", "ax650n")
    assert done.returncode == 1 and "give --ram and --bandwidth" in done.stderr
    for board, kernel in (("ax650n", "yes"), ("ax630c", "yes (8-bit on QGEMM, re-laid at load)")):
        out = json.loads(edgellm("plan", builds["s8", 4], "--board", board, "--ram", "2GB",
                                 "--bandwidth", "10", "--json").stdout)
        assert {r["weights"]: r["kernel"] for r in out["rows"]}["s8"] == kernel
    done = edgellm("build", builds["s8", 4].parent / "hf", "-o", tmp_path / "ax", "--target",
                   "ax630c", "--kv-cache-len", "32")
    assert done.returncode == 0 and "RAM unknown: not checked" in done.stderr, done.stderr
    assert json.loads((tmp_path / "ax" / "manifest.json").read_text())["weight_scheme"][
        "name"] == "s8"
