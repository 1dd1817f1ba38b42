"""Compile a source checkpoint into an artifact directory, one tensor at a time.

Everything is written to a temporary sibling directory that is renamed into place at the end,
so an interrupted or failed build leaves nothing behind at the output path.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgellm import __version__, dtypes
from edgellm.arch.spec import FUSED_LINEARS, LAYER_LINEARS
from edgellm.artifact import format as fmt
from edgellm.artifact.format import Manifest
from edgellm.artifact.writer import TensorFileWriter, write_raw
from edgellm.compiler.calibration import Calibration, calibration_ids, calibration_text
from edgellm.compiler.memory import check_fits
from edgellm.compiler.sources import Source, open_source
from edgellm.compiler.vendor_config import apply_vendor_config, read_vendor_config
from edgellm.errors import EdgeLLMError
from edgellm.fileutil import sample_sha256, sha256_file
from edgellm.quant.gptq import gptq_quantize
from edgellm.quant.schemes import (SCHEMES, GroupwiseIntScheme, layout_defaults, layout_schemes,
                                   quantize_rows, worst_relative_error)


@dataclass(frozen=True)
class BuildOptions:
    kv_cache_len: int = 1023
    prefill_len: int | None = None  # default: min(128, kv_cache_len)
    weight_type: str | None = "s8"  # None with a target: the target's choice
    # None: schemes.layout_defaults(weight_type) (s4: group 32, asymmetric, s8 lm_head;
    # otherwise group 128, symmetric, the lm_head like the layers)
    post_weight_type: str | None = None
    group_size: int | None = None
    asymmetric: bool | None = None  # integer schemes: a zero point per group as well as a scale
    hidden_state_type: str = "bf16"
    check_level: int = 0
    check_prompt: str = "1+1="
    force: bool = False
    memory_check: bool = True  # refuse, before any work, a model this machine cannot hold
    model_config: str | None = None  # the vendor's model-config JSON, overriding the source's
    keep_s8: str | None = None  # layers kept at s8 in a lower-bit build: "0,1,22-23"
    # MatMulNBits: 4 = int8 activations inside the matmul (fast); 0 = fp32 (8-bit: ~1 tok/s)
    accuracy_level: int = 4
    # integer weights: "rtn" (round to nearest) or "gptq" (fitted to calibration inputs)
    quant_method: str = "rtn"
    calibration: str | None = None  # text file for GPTQ; default: the built-in text
    calibration_tokens: int = 32768
    target: str | None = None  # a boards.BOARDS name: the layout chosen for its cores and RAM

    def __post_init__(self):
        if self.target is not None:
            from edgellm.boards import BOARDS

            if self.target not in BOARDS:
                raise EdgeLLMError(f"--target {self.target!r}: known boards are "
                                   f"{', '.join(BOARDS)}")
        elif self.weight_type is None:
            object.__setattr__(self, "weight_type", "s8")
        # with a target and no weight type, the builder chooses (for_target) once it knows
        # the model's size; the layout's defaults follow then
        for key, value in layout_defaults(self.weight_type).items() if self.weight_type else ():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.kv_cache_len < 2:
            raise EdgeLLMError(f"--kv-cache-len must be at least 2, not {self.kv_cache_len}")
        if self.prefill_len is None:
            object.__setattr__(self, "prefill_len", min(128, self.kv_cache_len))
        if not 1 <= self.prefill_len <= self.kv_cache_len:
            raise EdgeLLMError(f"--prefill-len must be between 1 and --kv-cache-len, "
                               f"not {self.prefill_len}")
        if self.hidden_state_type not in dtypes.HIDDEN_STATE_TYPES:
            raise EdgeLLMError(f"--hidden-state-type must be one of "
                               f"{', '.join(dtypes.HIDDEN_STATE_TYPES)}")
        if self.check_level not in (0, 1, 2):
            raise EdgeLLMError("--check-level must be 0, 1 or 2")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeLLMError("--accuracy-level must be 0-4 (MatMulNBits' accuracy_level)")
        if self.quant_method not in ("rtn", "gptq"):
            raise EdgeLLMError("--quant-method must be rtn or gptq")
        if self.calibration_tokens < 2:
            raise EdgeLLMError("--calibration-tokens must be at least 2")
        integer = [isinstance(SCHEMES.get(t), GroupwiseIntScheme)
                   for t in (self.weight_type, self.post_weight_type)]
        if self.quant_method == "gptq" and self.weight_type and not any(integer):
            raise EdgeLLMError("--quant-method gptq needs integer weights (--weight-type or "
                               "--post-weight-type s8 or s4)")
        if self.calibration is not None:
            if self.quant_method != "gptq":
                raise EdgeLLMError("--calibration is only read by --quant-method gptq")
            if not Path(self.calibration).is_file():
                raise EdgeLLMError(f"the calibration text {self.calibration} is not a file")

    def schemes(self, *others: str) -> list:
        """The layers' scheme, the lm_head's, then one per weight type in `others` (kept
        layers'), as quant.schemes.layout_schemes lays them out for these options."""
        return layout_schemes(self.weight_type, (self.post_weight_type, *others),
                              self.group_size, not self.asymmetric)


CALIBRATION_SEQ_LEN = 512  # tokens per calibration sequence (each from an empty KV cache)


def _say(msg: str):
    tqdm.write(msg, file=sys.stderr)  # above the progress bar, which stays at the bottom
    sys.stderr.flush()


_LOGGER: contextvars.ContextVar = contextvars.ContextVar("edgellm_build_log", default=_say)


def log(msg: str):
    _LOGGER.get()(msg)


class _Progress:
    """One progress bar over the whole build (on a terminal): a step per stage and per layer,
    the stage's name beside it."""

    def __init__(self, label: str):
        self.label = label
        self.bar = tqdm(total=None, desc=f"{label}: reading the source", unit="step",
                        file=sys.stderr, disable=None, leave=False,
                        bar_format="{desc}: {percentage:3.0f}%|{bar:24}| {elapsed}")

    def expect(self, layers: int):
        """Steps: source, tokenizer and embedding, each layer, lm_head, graphs and manifest."""
        self.bar.total = layers + 4
        self.bar.refresh()

    def step(self, stage: str, advance: int = 0):
        self.bar.set_description_str(f"{self.label}: {stage}", refresh=False)
        self.bar.update(advance)

    def close(self):
        self.bar.close()


def _prepare_output(output: Path, force: bool) -> Path:
    if output.exists() and not force:
        raise EdgeLLMError(f"output path {output} exists (use --force to replace it)")
    if not output.parent.is_dir():
        raise EdgeLLMError(f"output directory's parent {output.parent} does not exist")
    tmp = output.parent / f".{output.name}.tmp-build"
    # what an interrupted build left: its temporary directory, or (killed between the two
    # renames of a --force build) the replaced artifact
    for leftover in (tmp, _replaced(output)):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif leftover.exists():
            leftover.unlink()
    tmp.mkdir()
    return tmp


def _replaced(output: Path) -> Path:
    """Where an existing output waits, during `_commit`, to be deleted."""
    return output.parent / f".{output.name}.old"


def _commit(tmp: Path, output: Path):
    """Move the finished build into place; an existing output (with --force) goes only now."""
    if output.exists():
        old = _replaced(output)
        output.rename(old)
        tmp.rename(output)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(output)


class _LayerChecker:
    """--check-level 1: each quantized layer against its float original on the same input."""

    def __init__(self, source: Source, prompt_embeddings: np.ndarray, hidden: str,
                 kv_cache_len: int):
        self.cfg = source.config
        self.hidden, self.kv_cache_len = hidden, kv_cache_len
        rows = dtypes.bf16_bits_to_fp32(prompt_embeddings) * np.float32(self.cfg.embed_scale)
        self.h = dtypes.round_to(rows, hidden)

    def check(self, index: int, float_w: dict, quant_w: dict) -> float:
        from edgellm.runtime.reference import decoder_layer

        shape = (self.kv_cache_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        store = dtypes.STORAGE_DTYPE[self.hidden]
        outs = []
        for w in (float_w, quant_w):
            k, v = np.zeros(shape, store), np.zeros(shape, store)
            outs.append(decoder_layer(self.h, w, self.cfg, 0, k, v, self.hidden, layer=index))
        err = float(np.abs(outs[1] - outs[0]).max() / (np.abs(outs[0]).max() or 1.0))
        self.h = outs[0]
        return err


def _quantize(scheme, w: np.ndarray, gram) -> tuple[dict, float]:
    """Round to nearest, or GPTQ when the inputs' Gram matrix is given (integer schemes)."""
    if gram is None or not isinstance(scheme, GroupwiseIntScheme):
        return quantize_rows(scheme, w)
    parts = gptq_quantize(w, gram, scheme)
    return parts, worst_relative_error(w, scheme.dequantize(parts, w.shape[1]))


def _write_layer(source: Source, index: int, path: Path, scheme, checker,
                 calibration: Calibration | None) -> tuple[dict, float]:
    writer = TensorFileWriter(path)
    names = source.spec.layer_tensor_names(source.config)
    keep = bool(checker or calibration)  # the whole layer in memory, float and quantized
    float_w = {name: source.tensor(name, layer=index) for name in names} if keep else {}
    parts_of, worst = {}, 0.0

    def quantize(name: str, w: np.ndarray, gram=None) -> dict:
        nonlocal worst
        parts_of[name], error = _quantize(scheme, w, gram)
        worst = max(worst, error)
        return parts_of[name]

    quant_w = {}
    if calibration:  # GPTQ: the linears are quantized while the calibration steps through
        quant_w = calibration.fit_layer(index, float_w, lambda name, gram: scheme.dequantize(
            quantize(name, float_w[name], gram), float_w[name].shape[1]))

    def weight(name: str) -> np.ndarray:
        return float_w[name] if keep else source.tensor(name, layer=index)

    def linear(name: str) -> dict:
        w = weight(name)
        parts = parts_of.pop(name, None) or quantize(name, w)
        if keep and name not in quant_w:
            quant_w[name] = scheme.dequantize(parts, w.shape[1])
        return parts

    written = set()
    for name in names:
        if name in written:
            continue
        if name in LAYER_LINEARS:  # with the linears fused beside it, part by part
            group = next((g for g in FUSED_LINEARS if name in g), (name,))
            parts = {member: linear(member) for member in group}
            for part in parts[group[0]]:
                for member in group:
                    writer.add(f"{member}.{part}", parts[member][part])
            written.update(group)
        else:
            w = weight(name)
            writer.add(name, w.astype(np.float32))
            quant_w[name] = w
    if checker:
        log(f"  layer {index:3d}: worst weight error {worst:.2e}, "
             f"layer output relative error {checker.check(index, float_w, quant_w):.2e}")
    return writer.close(), worst


def _write_post(source: Source, path: Path, scheme,
                calibration: Calibration | None) -> tuple[dict, float]:
    writer = TensorFileWriter(path)
    norm = source.tensor("output_norm")
    writer.add("output_norm", norm)
    tied = source.config.tie_word_embeddings or not source.has("lm_head")
    w = source.tensor("embed" if tied else "lm_head")
    gram = calibration.lm_head_gram(norm) if calibration else None
    parts, error = _quantize(scheme, w, gram)
    del w
    for part, array in parts.items():
        writer.add(f"lm_head.{part}", array)
    return writer.close(), error


@contextlib.contextmanager
def quieted(quiet: bool):
    """While inside: the build's informational lines are dropped (`quiet`) or printed."""
    token = _LOGGER.set((lambda msg: None) if quiet else _say)
    try:
        yield
    finally:
        _LOGGER.reset(token)


def compile_artifact(input_path: str | Path, output: str | Path, opts: BuildOptions,
                     quiet: bool = False, label: str = "build") -> Path:
    """Compile `input_path` (HF dir or GGUF) into the artifact directory `output`, with
    --check-level 1's per-layer check (level 2 is `edgellm.compiler.build`'s); `quiet` keeps
    only the progress bar (named `label`) and errors."""
    with quieted(quiet):
        progress = _Progress(label)
        try:
            return _compile(input_path, output, opts, progress)
        finally:
            progress.close()


def _compile(input_path: str | Path, output: str | Path, opts: BuildOptions,
             progress: _Progress) -> Path:
    source = open_source(input_path)
    if opts.model_config:
        vendor = read_vendor_config(opts.model_config)
        source.config = apply_vendor_config(vendor, source.config)
    if opts.target:
        opts = for_target(opts, source.config)
    scheme, post_scheme = opts.schemes()
    _check_sliding_window(source.config, opts)
    if opts.memory_check:
        check_fits(source.config, scheme, post_scheme, opts.kv_cache_len,
                   opts.calibration_tokens if opts.quant_method == "gptq" else 0)
    output = Path(output).absolute()
    tmp = _prepare_output(output, opts.force)
    progress.expect(source.config.num_layers)
    try:
        manifest = _build_into(source, tmp, opts, scheme, post_scheme, progress)
        (tmp / fmt.MANIFEST_NAME).write_text(manifest.to_json())
        _commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.step("done", 1)
    return output


def peak_rss() -> int:
    """Bytes: the most this process has held in RAM so far (Linux and macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# what --target tries, best first: (weight type, lm_head, group, symmetric)
TARGET_LAYOUTS = [("s8", "s8", 128, True), ("s4", "s8", 32, False), ("s4", "s4", 32, False)]


def for_target(opts: BuildOptions, cfg) -> BuildOptions:
    """The options with the layout for opts.target: the first of TARGET_LAYOUTS that ONNX
    Runtime has kernels for on the board's cores and that fits its RAM (runtime.cpu, plan);
    a layout the user gave is checked instead of chosen."""
    import dataclasses

    import onnxruntime

    from edgellm.compiler.memory import footprint
    from edgellm.boards import BOARDS
    from edgellm.runtime.cpu import Cpu, without_kernel

    board, cpu = BOARDS[opts.target], Cpu.core(BOARDS[opts.target].cpu)
    given = opts.weight_type is not None
    layouts = [(opts.weight_type, opts.post_weight_type, opts.group_size,
                not opts.asymmetric)] if given else TARGET_LAYOUTS
    tried = []
    for weights, post, group, symmetric in layouts:
        scheme, post_scheme = layout_schemes(weights, (post,), group, symmetric)
        slow = without_kernel(cpu, [scheme.to_dict(), post_scheme.to_dict()],
                              opts.accuracy_level, onnxruntime.__version__)
        need = footprint(cfg, scheme, post_scheme, opts.kv_cache_len).runtime
        if not slow and (board.ram is None or need <= board.ram):
            ram = "RAM unknown: not checked" if board.ram is None else f"{board.ram / 1e9:g} GB"
            log(f"target {opts.target} ({cpu.name}, {ram}): weights {weights}, "
                f"lm_head {post}, group {group}, {'symmetric' if symmetric else 'asymmetric'}")
            return dataclasses.replace(opts, weight_type=weights, post_weight_type=post,
                                       group_size=group, asymmetric=not symmetric)
        tried.append(f"{weights}/{post}: " + (slow[0] if slow else
                                              f"needs {need / 1e9:.2f} GB of RAM"))
    raise EdgeLLMError(f"nothing fits --target {opts.target} ({board.note}): "
                       + "; ".join(tried))


def kept_layers(pattern: str | None, num_layers: int) -> set[int]:
    """--keep-s8 "0,1,22-23" (negative indices count from the end: "-2--1") -> layer indices."""
    if not pattern:
        return set()
    kept = set()
    for part in pattern.split(","):
        m = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?", part)
        if not m:
            raise EdgeLLMError(f"--keep-s8 {pattern!r}: {part!r} is not a layer or a range a-b")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if not all(-num_layers <= i < num_layers for i in (first, last)):
            raise EdgeLLMError(f"--keep-s8 {pattern!r}: {part!r} is outside layers "
                               f"0-{num_layers - 1}")
        kept.update(range(first % num_layers, last % num_layers + 1))
    return kept


def _check_sliding_window(cfg, opts: BuildOptions):
    if cfg.sliding_window and opts.kv_cache_len > cfg.sliding_window:
        raise EdgeLLMError(
            f"--kv-cache-len {opts.kv_cache_len} exceeds this model's attention window of "
            f"{cfg.sliding_window} positions (sliding-window attention is not implemented); "
            f"build with --kv-cache-len {cfg.sliding_window} or less")


def _build_into(source: Source, tmp: Path, opts: BuildOptions, scheme, post_scheme,
                progress: _Progress) -> Manifest:
    cfg = source.config
    source.check_names()
    progress.step("tokenizer and embedding", 1)
    log(f"building {cfg.arch}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
         f"vocab {cfg.vocab_size}, weights {scheme.name}, lm_head {post_scheme.name}")
    tok = source.tokenizer()
    (tmp / fmt.TOKENIZER_FILE).write_text(tok.tokenizer_json)
    files: dict[str, dict] = {}

    embed = source.tensor("embed")
    files[fmt.EMBED_FILE] = write_raw(tmp / fmt.EMBED_FILE, embed, dtypes.fp32_to_bf16_bits)
    checker = None
    if opts.check_level >= 1:
        from tokenizers import Tokenizer

        ids = Tokenizer.from_str(tok.tokenizer_json).encode(opts.check_prompt).ids or [0]
        checker = _LayerChecker(source, dtypes.fp32_to_bf16_bits(embed[ids]),
                                opts.hidden_state_type, opts.kv_cache_len)
    calibration, quantization = _calibration(cfg, embed, tok.tokenizer_json, opts)
    del embed
    tok.tokenizer_json = ""  # written above; free the large string

    layers, layer_schemes = [], {}
    kept = kept_layers(opts.keep_s8, cfg.num_layers)
    keep_scheme = opts.schemes("s8")[2]
    worst = 0.0
    for i in range(cfg.num_layers):
        progress.step(f"layer {i + 1}/{cfg.num_layers}", 1)
        name = fmt.layer_file(i)
        layer_scheme = keep_scheme if i in kept else scheme
        if layer_scheme != scheme:
            layer_schemes[name] = layer_scheme.to_dict()
        files[name], err = _write_layer(source, i, tmp / name, layer_scheme, checker,
                                        calibration)
        worst = max(worst, err)
        layers.append(name)
    progress.step("lm_head", 1)
    files[fmt.POST_FILE], post_err = _write_post(source, tmp / fmt.POST_FILE, post_scheme,
                                                 calibration)
    log(f"worst relative weight error: layers {worst:.2e}, lm_head {post_err:.2e}")

    source.check_all_used()
    files[fmt.TOKENIZER_FILE] = _file_entry(tmp / fmt.TOKENIZER_FILE)
    progress.step("ONNX graphs", 1)
    graphs = _emit_graphs(tmp, cfg, files, layers, scheme, post_scheme, opts, layer_schemes)
    for name, entry in files.items():  # checked at every load (the full sha256 by --verify)
        entry["sample_sha256"] = sample_sha256(tmp / name)
    return Manifest(
        format_version=fmt.FORMAT_VERSION,
        producer=f"edgellm {__version__}",
        config=cfg.to_dict(),
        weight_scheme=scheme.to_dict(),
        post_scheme=post_scheme.to_dict(),
        kv_cache_len=opts.kv_cache_len,
        prefill_len=opts.prefill_len,
        hidden_state_type=opts.hidden_state_type,
        tokenizer=tok.manifest_entry(fmt.TOKENIZER_FILE),
        source={"kind": source.kind, "path": str(Path(source.path).absolute())},
        embedding={"file": fmt.EMBED_FILE, "dtype": "bf16",
                   "shape": [cfg.vocab_size, cfg.hidden_size]},
        layers=layers,
        post=fmt.POST_FILE,
        graphs=graphs,
        files=files,
        layer_schemes=layer_schemes,
        quantization=quantization,
        target={"board": opts.target} if opts.target else {},
    )


def _calibration(cfg, embed: np.ndarray, tokenizer_json: str,
                 opts: BuildOptions) -> tuple[Calibration | None, dict]:
    """The GPTQ calibration state (None for round to nearest) and its manifest entry."""
    if opts.quant_method == "rtn":
        return None, {"method": "rtn"}
    ids = calibration_ids(tokenizer_json, calibration_text(opts.calibration),
                          opts.calibration_tokens)
    log(f"{opts.quant_method.upper()}: calibrating on {len(ids)} tokens of "
         f"{opts.calibration or 'the built-in calibration text'}")
    entry = {"method": opts.quant_method, "calibration_tokens": len(ids),
             "calibration_text": Path(opts.calibration).name if opts.calibration else "built-in"}
    return Calibration(cfg, embed, ids, CALIBRATION_SEQ_LEN, opts.kv_cache_len), entry


def _emit_graphs(tmp: Path, cfg, files: dict, layers: list[str], scheme, post_scheme,
                 opts: BuildOptions, layer_schemes: dict) -> dict:
    """ONNX graphs over the weight files, for the ONNX Runtime engine (integer schemes only)."""
    from edgellm.onnx import graphs as og

    if not (og.supports(scheme.to_dict()) and og.supports(post_scheme.to_dict())):
        log(f"no ONNX graphs for weight type {scheme.name}/{post_scheme.name}: "
             "the numpy engine will run this artifact")
        return {}
    unsupported = og.unsupported_shape(cfg)
    if unsupported:
        log(f"no ONNX graphs for {unsupported}: the numpy engine will run this artifact")
        return {}
    names = []
    for index, layer in enumerate(layers):
        name = layer.replace(".bin", ".onnx")
        og.layer_graph(tmp / name, cfg, index, layer, files[layer]["tensors"],
                       layer_schemes.get(layer, scheme.to_dict()), opts.kv_cache_len,
                       opts.hidden_state_type, opts.accuracy_level)
        names.append(name)
    og.post_graph(tmp / fmt.POST_GRAPH, cfg, fmt.POST_FILE, files[fmt.POST_FILE]["tensors"],
                  post_scheme.to_dict(), opts.accuracy_level)
    for name in [*names, fmt.POST_GRAPH]:
        files[name] = _file_entry(tmp / name)
    return {"engine": "onnxruntime", "layers": names, "post": fmt.POST_GRAPH,
            "batch": True,  # graphs with a batch dimension: `serve --parallel N` (2026-12-02)
            "kv_cache_dtype": "fp32", "accuracy_level": opts.accuracy_level,
            "activation": "fp32" + (", int8 inside MatMulNBits" if opts.accuracy_level == 4
                                    else "")}


def _file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path), "tensors": {}}
