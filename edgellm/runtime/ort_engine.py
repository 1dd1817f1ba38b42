"""The ONNX Runtime engine: one session per decoder layer + one for the post part.

Sessions are created once; the KV cache is preallocated per layer as
[slots, kv_heads, kv_cache_len, head_dim] fp32 OrtValues bound as both past and present, so
GroupQueryAttention updates it in place; a slot is one sequence's region (one for the CLI,
`serve --parallel N` has N). Decode reuses bindings made once per run of neighbouring
slots (two ping-pong hidden-state buffers), so a token costs one `run_with_iobinding` per
session and no allocation; `decode_rows` runs one token for each of several neighbouring slots
in one call per session.
"""

from __future__ import annotations

import mmap
from dataclasses import replace

import numpy as np

from edgellm.artifact.reader import Artifact
from edgellm.errors import EdgeLLMError
from edgellm.machine import give_back_freed_memory
from edgellm.runtime.engine import embedding_rows


_GLOBAL_POOL: list[int | None] = []  # the threads of the process-wide pool, once created


def _use_global_thread_pool(ort, threads: int | None) -> None:
    """One intra-op pool for all sessions: 25 per-session pools of spinning threads fight over
    2 cores (measured: 6 ms instead of 0.26 ms per layer per token)."""
    if _GLOBAL_POOL:
        return
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
    _GLOBAL_POOL.append(threads)


def _session_options(ort, threads: int | None):
    _use_global_thread_pool(ort, threads)
    so = ort.SessionOptions()
    so.use_per_session_threads = False
    # no arena: prefill's large activations would stay reserved (measured: RSS 884 -> 667 MB
    # for the 0.5B model after a 128-token prefill, decode speed unchanged)
    so.enable_cpu_mem_arena = False
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def _choose_kernel(artifact: Artifact, ort_version: str, threads: int, kernel: str,
                   allow_slow: bool, make_session):
    """The path for the 8-bit weights on this CPU (runtime.kernels: forced, the only one, cached
    or measured); never the per-call dequantizing path without saying so (runtime.cpu)."""
    import sys

    from edgellm.runtime import kernels
    from edgellm.runtime.cpu import read_cpu, slow_parts

    cpu = read_cpu()
    slow = slow_parts(artifact.manifest, cpu, ort_version)
    if slow and kernel == "matmulnbits" and allow_slow:
        print(f"edgellm: warning: onnxruntime {ort_version} on this CPU ({cpu.name}) has no "
              f"kernel for {'; '.join(slow)}, so it dequantizes those weights on every token "
              f"(tens of times slower)", file=sys.stderr)
        return kernels.Choice("matmulnbits", "--kernel matmulnbits --allow-slow-kernels")
    try:
        return kernels.choose(artifact, cpu, ort_version, threads, make_session, kernel)
    except EdgeLLMError as e:
        if slow and kernel == "matmulnbits":
            raise EdgeLLMError(f"{e}; run it anyway with --allow-slow-kernels (it dequantizes "
                               f"those weights on every token, tens of times slower), or rebuild "
                               f"with --accuracy-level 4") from None
        raise


def _int_bits(artifact: Artifact) -> dict[str, int]:
    """The layer and post files with integer weights (what QGEMM re-lays): name -> bits."""
    from edgellm.runtime.kernels import is_int

    m = artifact.manifest
    parts = [(layer, m.layer_schemes.get(layer) or m.weight_scheme) for layer in m.layers]
    parts.append((m.post, m.post_scheme))
    return {name: scheme["bits"] for name, scheme in parts if is_int(scheme)}


def _relaid_bytes(artifact: Artifact, int_bits: dict[str, int], names) -> int:
    """About what the re-laid int8 weights of these files take: each 8-bit file's size, twice
    each 4-bit one's (an upper bound: a g32 4-bit file is 0.64 bytes a weight, int8 1)."""
    files = artifact.manifest.files
    return sum(files.get(n, {}).get("size", 0) * (8 // int_bits[n]) for n in names
               if n in int_bits)


def _with_memory(choice, artifact: Artifact, int_bits: dict[str, int],
                 forced: bool) -> tuple[object, tuple[int, ...]]:
    """(the choice, the bit widths its QGEMM sessions re-lay) as measured, or less where this
    machine's available memory would not hold it with half to spare: no prefill path where the
    layers' weights twice would not fit; 4-bit weights left on MatMulNBits where their int8
    re-layout (twice their bytes) would not (matmulnbits instead, where it has kernels for the
    rest, unless --kernel qgemm asked for it)."""
    from edgellm.machine import machine_memory
    from edgellm.runtime import kernels

    available = machine_memory()[1]
    if choice.prefill_path:
        extra = _relaid_bytes(artifact, int_bits, artifact.manifest.layers)
        if 2 * extra > available:
            choice = choice.without_prefill_path(
                f"the layers on {choice.prefill_path} for prompts would need {extra / 1e6:,.0f}"
                f" MB more, and {available / 1e6:,.0f} MB are available")
    four = [n for n, b in int_bits.items() if b == 4]
    if choice.path != "qgemm" or not four or forced:
        return choice, (4, 8)
    grows = _relaid_bytes(artifact, int_bits, four) // 2  # int8 in place of the 4-bit bytes
    if 2 * grows <= available:
        return choice, (4, 8)
    why = (f"the 4-bit weights re-laid as int8 would need {grows / 1e6:,.0f} MB more, and "
           f"{available / 1e6:,.0f} MB are available")
    if set(int_bits.values()) == {4}:
        return kernels.Choice("matmulnbits", why, choice.weights, choice.measured,
                              timed=choice.timed), (4, 8)
    return replace(choice, why=f"{choice.why}; 8-bit weights only: {why}"), (8,)


def _session(ort, path, so, providers, relaid: bool = False, threads: int | None = None,
             weights: str = "s8", context=None, bits: tuple[int, ...] = (4, 8), int8_cache=None):
    """A session of the graph at `path`: as built, re-laid for QGEMM (`relaid`), and/or changed
    for a KV cache of another length (`context`: (config, layer, positions)) or held as int8
    (`int8_cache`: the layer's (k, v) scales, runtime.kv_quant)."""
    from edgellm.fileutil import cache_dir
    from edgellm.onnx.graphs import with_context, with_int8_cache
    from edgellm.onnx.qgemm import mapped, relayout

    try:
        # (graph, external weights), or None: nothing 8-bit in it
        model = relayout(path, cache_dir() / "tmp", weights, bits) if relaid else None
        if model is None and context is None and int8_cache is None:
            return ort.InferenceSession(str(path), so, providers=providers)
        graph, external = model or mapped(path)
        if context is not None:
            with_context(graph, *context)
        if int8_cache is not None:
            with_int8_cache(graph, *int8_cache)
        own = _session_options(ort, threads)  # these initializers are this graph's alone
        own.add_external_initializers(list(external),
                                      [ort.OrtValue.ortvalue_from_numpy(a)
                                       for a in external.values()])
        session = ort.InferenceSession(graph.SerializeToString(), own, providers=providers)
        session.edgellm_external = external  # mapped while the session lives
        advice = getattr(mmap, "MADV_DONTNEED", None)
        for weights in external.values():  # ORT packed them: out of RSS (the file stays mapped,
            mapping = getattr(weights, "_mmap", None)  # a later read would fault them back)
            if advice is not None and mapping is not None:
                mapping.madvise(advice)
        return session
    except Exception as e:  # onnxruntime's own types: InvalidProtobuf, Fail, InvalidGraph, ...
        raise EdgeLLMError(f"the ONNX graph {path} does not load ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); if the artifact is "
                           f"damaged, `edgellm inspect {path.parent} --verify` says so; "
                           f"rebuild it") from None


def _kv_peaks(artifact: Artifact, ids: list[int], threads: int | None, kernel: str):
    """Each channel's largest |K| and |V| ([layers, kv_heads, head_dim]) over ids, run through
    an fp32 cache on `kernel`'s path (the int8 cache's calibration, runtime.kv_quant)."""
    engine = OrtEngine(artifact, threads=threads, kernel=kernel, allow_slow_kernels=True,
                       context=max(len(ids) + 1, artifact.manifest.kv_cache_len))
    for start in range(0, len(ids), engine.prefill_len):
        engine.forward(ids[start:start + engine.prefill_len], start)
    n = len(ids)
    return (np.abs(engine.k_np[:, 0, :, :n]).max(axis=2),
            np.abs(engine.v_np[:, 0, :, :n]).max(axis=2))


class OrtEngine:
    """forward(tokens, pos) -> logits, like NumpyEngine, on ONNX Runtime."""

    def __init__(self, artifact: Artifact, threads: int | None = None,
                 providers: list[str] | None = None, allow_slow_kernels: bool = False,
                 kernel: str = "auto", slots: int = 1, context: int | None = None,
                 cache_type: str = "fp32"):
        """kernel: the path of the integer weights (runtime.kernels): "matmulnbits" (the graphs
        as built), "qgemm" (re-laid at load for ORT's integer GEMM, edgellm.onnx.qgemm),
        "auto" (the faster, measured at the first load on this CPU, then cached) or "mixed"
        (auto, and prompt chunks on the other path where that was measured faster).
        slots: sequences with a KV cache each. context: its positions (default: the artifact's
        kv_cache_len; another length changes the layer graphs at load, runtime.context).
        cache_type: "fp32" (as built) or "int8" (runtime.kv_quant; the layer graphs changed at
        load)."""
        import onnxruntime as ort

        from edgellm.runtime import kernels, kv_quant

        m = artifact.manifest
        if not m.graphs:
            raise EdgeLLMError(f"{artifact.path} has no ONNX graphs (weight type "
                               f"{m.weight_scheme['name']}); use --engine numpy")
        if slots > 1 and not m.graphs.get("batch"):
            raise EdgeLLMError(f"{artifact.path} was built before graphs took a batch (2026-12-02)"
                               f": it serves one request at a time; rebuild it to serve "
                               f"{slots} at once")
        providers = providers or ["CPUExecutionProvider"]
        so = _session_options(ort, threads)
        self.threads = _GLOBAL_POOL[0] or threads  # the process-wide pool's (the first engine's)
        measured = lambda name, qgemm, weights: _session(  # noqa: E731
            ort, artifact.path / name, so, providers, qgemm, threads, weights)
        self.kernel = _choose_kernel(artifact, ort.__version__, self.threads, kernel,
                                     allow_slow_kernels, measured)
        int_bits = _int_bits(artifact)  # layer/post file -> bits of its integer weights
        self.kernel, bits = _with_memory(self.kernel, artifact, int_bits, kernel in kernels.PATHS)
        self.ort = ort
        self.config = cfg = artifact.config
        self.kv_cache_len, self.prefill_len = context or m.kv_cache_len, m.prefill_len
        self.hidden_type = m.hidden_state_type
        self.embed = artifact.embedding()  # [vocab, hidden] bf16 bits, mmapped
        weights = self.kernel.weights
        resized = self.kv_cache_len != m.kv_cache_len
        layer_of = {name: i for i, name in enumerate(m.graphs["layers"])}
        self.cache_type = kv_quant.check(cache_type)
        # int8: the scales (measured once per artifact on an fp32 cache, before these sessions
        # exist, so that the two engines are never in memory together), broadcast as a slot's
        # K/V snapshot is laid out [layers, 1, kv_heads, positions, head_dim]
        scales = kv_quant.scales(artifact, lambda ids: _kv_peaks(
            artifact, ids, self.threads, self.kernel.path)) if cache_type == "int8" else None
        self.key_scale = scales[0][:, None, :, None, :] if scales else None
        self.value_scale = scales[1][:, None, :, None, :] if scales else None

        def load(name, qgemm):
            layer = layer_of.get(name)
            return _session(ort, artifact.path / name, so, providers, qgemm, threads, weights,
                            (cfg, layer, self.kv_cache_len) if resized and layer is not None
                            else None, bits,
                            (scales[0][layer], scales[1][layer]) if scales and layer is not None
                            else None)

        on_qgemm = self.kernel.path == "qgemm"
        # the post session first: ORT prepacks the lm_head (136 MB for Qwen2-0.5B) through a
        # transient buffer, which then peaks before the layers are resident, not on top of them
        self.post = load(m.graphs["post"], on_qgemm)
        self.layers = [load(name, on_qgemm) for name in m.graphs["layers"]]
        # forwards of prefill_rows rows or more (prompt chunks) on the other path's sessions,
        # where it was measured faster there (runtime.kernels) and memory holds both
        # (a layer without integer weights is the same graph on either path: its session serves)
        relaid = [int_bits.get(layer) in bits for layer in m.layers]
        self.prefill_layers = [load(name, not on_qgemm) if other else same for name, other, same
                               in zip(m.graphs["layers"], relaid, self.layers)] \
            if self.kernel.prefill_path else None
        self.prefill_rows = self.kernel.prefill_rows if self.prefill_layers else 1 << 30
        # the graphs whose integer weights were re-laid (those without any kept their graph)
        sessions = [(m.graphs["post"], self.post), *zip(m.graphs["layers"], self.layers),
                    *zip(m.graphs["layers"], self.prefill_layers or [])]
        self.relaid = {name for name, s in sessions if hasattr(s, "edgellm_external")}
        self.slots = slots
        self._manifest = m
        shape = (len(self.layers), slots, cfg.num_kv_heads, self.kv_cache_len, cfg.head_dim)
        # kv: [layers, slots, kv_heads, kv_cache_len, head_dim] fp32 (or int8); a run of
        # neighbouring slots of one layer is contiguous and wrapped (not copied) as an OrtValue
        # that GQA updates in place
        store = np.int8 if cache_type == "int8" else np.float32
        self.k_np, self.v_np = np.zeros(shape, store), np.zeros(shape, store)
        # written once now, so that no request pays for the pages: the first write to fresh
        # memory faults each page in, which cost a prefix restored from disk after a restart
        # 0.6-0.8 s of its first token on the AVX2-only host (74 MB into a 400 MB cache; 9 ms
        # once the pages were there); the KV cache is counted whole in every memory check
        for cache in (self.k_np, self.v_np):
            cache.fill(0)
        self._views: dict[tuple[int, int], tuple[list, list]] = {}
        self._decode: dict[tuple[int, int], tuple] = {}  # (first, count) -> one-token bindings
        give_back_freed_memory()  # what packing the weights left behind

    def _cache(self, first: int, count: int) -> tuple[list, list]:
        """Per layer, OrtValues over slots first .. first+count-1 of the K and V caches."""
        if (first, count) not in self._views:
            wrap = self.ort.OrtValue.ortvalue_from_numpy
            self._views[first, count] = (
                [wrap(k[first:first + count]) for k in self.k_np],
                [wrap(v[first:first + count]) for v in self.v_np])
        return self._views[first, count]

    def row_cost(self) -> float | None:
        """What each further row of a few-row forward (a verify of drafts) costs, as a share of
        a one-row forward, from the kernel choice's measurement (None: not measured)."""
        times = self.kernel.measured.get(self.kernel.path, {}) \
            if self.kernel.timed == "layers" else {}  # the lm_head alone says little
        if "1" not in times or "4" not in times or times["1"] <= 0:
            return None
        return (times["4"] - times["1"]) / 3 / times["1"]

    def sessions(self, rows: int) -> list:
        """The layer sessions for a forward of `rows` rows in all (batch x tokens)."""
        return self.prefill_layers if rows >= self.prefill_rows else self.layers

    def _bind_layer(self, i: int, hidden, out, seqlens, total, cache, rows: int = 1):
        k, v = cache[0][i], cache[1][i]
        b = self.sessions(rows)[i].io_binding()
        b.bind_ortvalue_input("hidden", hidden)
        b.bind_ortvalue_input("past_key", k)
        b.bind_ortvalue_input("past_value", v)
        b.bind_ortvalue_input("seqlens_k", seqlens)
        b.bind_ortvalue_input("total_seq_len", total)
        b.bind_ortvalue_output("hidden_out", out)
        b.bind_ortvalue_output("present_key", k)
        b.bind_ortvalue_output("present_value", v)
        return b

    def _decode_bindings(self, first: int, count: int = 1):
        """The bindings for one token of each of the slots first.., made once per run of
        slots: layer i reads buffer i%2 and writes the other; (layer bindings, post binding,
        hidden buffer, seqlens, total, logits)."""
        if (first, count) in self._decode:
            return self._decode[first, count]
        ov = self.ort.OrtValue
        hbuf = [np.zeros((count, 1, self.config.hidden_size), np.float32) for _ in range(2)]
        seqlens, total = np.zeros(count, np.int32), np.zeros((), np.int32)
        bufs = [ov.ortvalue_from_numpy(h) for h in hbuf]
        seq, tot = ov.ortvalue_from_numpy(seqlens), ov.ortvalue_from_numpy(total)
        cache = self._cache(first, count)
        layers = [self._bind_layer(i, bufs[i % 2], bufs[(i + 1) % 2], seq, tot, cache, count)
                  for i in range(len(self.layers))]
        post = self.post.io_binding()
        post.bind_ortvalue_input("hidden", bufs[len(self.layers) % 2])
        logits = np.zeros((count, 1, self.config.vocab_size), np.float32)
        post.bind_ortvalue_output("logits", ov.ortvalue_from_numpy(logits))
        self._decode[first, count] = layers, post, hbuf[0], seqlens, total, logits
        return self._decode[first, count]

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return embedding_rows(self.embed, tokens, self.config)

    def _check(self, pos: int, n: int):
        if pos + n > self.kv_cache_len:
            raise EdgeLLMError(f"positions {pos}..{pos + n - 1} exceed the KV cache "
                               f"of {self.kv_cache_len}")

    def forward(self, tokens, pos: int, all_logits: bool = False, slot: int = 0) -> np.ndarray:
        """Run tokens at positions pos.. of a slot; logits [vocab] of the last one (or
        [n, vocab])."""
        tokens = np.asarray(tokens, dtype=np.int64)
        self._check(pos, len(tokens))
        if len(tokens) == 1 and not all_logits:
            return self._decode_step(tokens, [pos], slot)[0]
        h = self._layers(self.embed_tokens(tokens)[None], [pos + len(tokens) - 1], slot)
        last = h if all_logits else h[:, -1:]
        logits = self.post.run(["logits"], {"hidden": np.ascontiguousarray(last)})[0][0]
        return logits if all_logits else logits[0]

    def _decode_step(self, tokens: np.ndarray, positions: list[int], first: int) -> np.ndarray:
        """One token for each of the slots first.. at its position: logits [rows, vocab]."""
        layers, post, hidden, seqlens, total, logits = self._decode_bindings(first, len(tokens))
        seqlens[:], total[()] = positions, max(positions) + 1
        hidden[:, 0] = self.embed_tokens(tokens)
        for session, binding in zip(self.sessions(len(tokens)), layers):
            session.run_with_iobinding(binding)
        self.post.run_with_iobinding(post)
        return logits[:, 0].copy()  # the buffer is reused by the next step

    def decode_rows(self, first: int, tokens: list[int], positions: list[int]) -> np.ndarray:
        """One token for each of the slots first, first+1, ... at its own position, in one call
        per session; logits [rows, vocab]. A row whose token is -1 has no request: it runs
        token 0 (its result is dropped), so its position must not hold K/V anyone needs."""
        for p in positions:
            self._check(p, 1)
        return self._decode_step(np.array([max(t, 0) for t in tokens], np.int64), positions,
                                 first)

    def _layers(self, h: np.ndarray, last_positions: list[int], first: int) -> np.ndarray:
        """Hidden states [b, n, D] of slots first.. through every layer; last_positions: each
        sequence's last position (seqlens_k)."""
        ov = self.ort.OrtValue
        seq = ov.ortvalue_from_numpy(np.asarray(last_positions, np.int32))
        tot = ov.ortvalue_from_numpy(np.array(max(last_positions) + 1, np.int32))
        cache = self._cache(first, len(h))
        rows = h.shape[0] * h.shape[1]
        sessions = self.sessions(rows)
        for i in range(len(self.layers)):
            out = np.empty_like(h)
            b = self._bind_layer(i, ov.ortvalue_from_numpy(h), ov.ortvalue_from_numpy(out),
                                 seq, tot, cache, rows)
            sessions[i].run_with_iobinding(b)
            h = out
        return h

    def kv_bytes(self) -> int:
        """The KV cache of all slots, as allocated."""
        return self.k_np.nbytes + self.v_np.nbytes

    def decode_weight_bytes(self) -> int:
        """The weights one decoded token reads, as its sessions hold them: a re-laid graph's
        int8 weights (twice a 4-bit file's bytes), else the layer's or the post file."""
        m = self._manifest
        total = 0
        for name, session in zip([*m.layers, m.post], [*self.layers, self.post]):
            external = getattr(session, "edgellm_external", None)
            total += sum(a.nbytes for a in external.values()) if external \
                else m.files[name]["size"]
        return total

    def kv_snapshot(self, n: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Copies of a slot's first n cache positions of every layer."""
        return (self.k_np[:, slot:slot + 1, :, :n].copy(),
                self.v_np[:, slot:slot + 1, :, :n].copy())

    def kv_restore(self, snapshot: tuple[np.ndarray, np.ndarray], slot: int = 0,
                   at: int = 0) -> int:
        """Put a snapshot into a slot at positions at..; the position after it."""
        k, v = snapshot
        if k.dtype != self.k_np.dtype or v.dtype != self.v_np.dtype:
            raise EdgeLLMError(f"a K/V snapshot of {k.dtype} into a {self.cache_type} cache")
        end = at + k.shape[3]
        self._check(at, k.shape[3])
        self.k_np[:, slot:slot + 1, :, at:end], self.v_np[:, slot:slot + 1, :, at:end] = k, v
        return end
