"""The context a model runs with: the artifact's kv_cache_len, or another length asked for at run
time (--ctx-size) up to the model's trained context and what this machine's memory holds. The
ONNX Runtime engine changes its layer graphs at load for another length (onnx.graphs
.with_context); no rebuild."""

from __future__ import annotations

from edgellm.errors import EdgeLLMError

GB = 1e9


def check_trained(cfg, requested: int) -> None:
    """Refuse a context below 1 or beyond the model's trained one."""
    if requested < 1:
        raise EdgeLLMError(f"--ctx-size must be at least 1, not {requested}")
    trained = cfg.max_position_embeddings
    if requested > trained:
        raise EdgeLLMError(f"--ctx-size {requested} is beyond the {trained:,} positions this "
                           f"model was trained for")


def context_length(artifact, requested: int | None = None, slots: int = 1,
                   available: int | None = None, cache_type: str = "fp32") -> int:
    """The KV cache length to run `artifact` with: `requested` (--ctx-size) checked against
    the trained context and the memory available (with `slots` caches of `cache_type`), else
    the artifact's."""
    from edgellm.machine import machine_memory

    m, cfg = artifact.manifest, artifact.config
    if requested is None:
        return m.kv_cache_len
    check_trained(cfg, requested)
    per_position = cfg.kv_bytes_per_position(cache_type) * slots
    weights = sum(info.get("size", 0) for info in m.files.values())
    if available is None:
        available = machine_memory()[1]
    if requested * per_position + weights > available:
        fit = max(0, int((available - weights) // per_position))
        raise EdgeLLMError(
            f"--ctx-size {requested} needs {requested * per_position / GB:.2f} GB of KV cache"
            f"{f' ({slots} slots)' if slots > 1 else ''} beside {weights / GB:.2f} GB of "
            f"weights, and {available / GB:.2f} GB are available: use --ctx-size {fit} or less"
            if fit else f"--ctx-size {requested}: this machine has no memory to spare for a "
            f"KV cache ({available / GB:.2f} GB available, {weights / GB:.2f} GB of weights)")
    return requested


def more_context(cfg, needed: int) -> str:
    """How to run a prompt of `needed` positions: a --ctx-size that holds it, or why none does."""
    trained = cfg.max_position_embeddings
    if needed >= trained:
        return f"this model was trained for {trained:,} positions: shorten the prompt"
    size = min(trained, -(-(needed + 256) // 1024) * 1024)  # room to answer, whole K
    return f"start it with --ctx-size {size} (up to {trained:,}; no rebuild) or shorten the prompt"
