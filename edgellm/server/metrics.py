"""`GET /metrics` in the Prometheus text format (version 0.0.4): each metric with its # HELP
and # TYPE lines, counters ending in _total, labels where one count has kinds. `parse` reads it
back into {name or name{labels}: value} for the benchmarks and tests."""

from __future__ import annotations

# name (without the edgellm_ prefix) -> (type, help)
METRICS = {
    "requests_total": ("counter", "Requests admitted to generate (OpenAI and Ollama APIs)."),
    "rejected_total": ("counter", "Requests refused before generating, by reason: queue_full "
                                  "(429), context_length (400), shutting_down (503)."),
    "prompt_tokens_total": ("counter", "Prompt tokens of finished generations."),
    "completion_tokens_total": ("counter", "Tokens generated."),
    "prefix_cache_hits_total": ("counter", "Generations that reused a cached prompt prefix."),
    "prefix_cache_reused_tokens_total": ("counter", "Prompt tokens taken from a KV cache "
                                                    "instead of prefilled."),
    "prefix_cache_slot_swaps_total": ("counter", "Cached prefixes copied into a generation "
                                                 "slot."),
    "prefix_cache_moved_tokens_total": ("counter", "Cached tokens moved past a change in the "
                                                   "prompt (--cache-reuse)."),
    "prompt_cache_disk_hits_total": ("counter", "Prompt prefixes read from the --prompt-cache "
                                                "directory."),
    "prompt_cache_files": ("gauge", "Prompt prefixes stored in the --prompt-cache directory."),
    "prompt_cache_writes_total": ("counter", "Prompt prefixes written to the --prompt-cache "
                                             "directory."),
    "draft_tokens_proposed_total": ("counter", "Speculative draft tokens proposed."),
    "draft_tokens_accepted_total": ("counter", "Speculative draft tokens the model accepted."),
    "last_decode_tok_s": ("gauge", "Decode speed of the last finished generation, tokens/s."),
    "last_ttft_ms": ("gauge", "Time to the first token of the last finished generation, ms."),
    "queue_depth": ("gauge", "Admitted requests: generating plus waiting for a slot."),
    "slots": ("gauge", "Generation slots (serve --parallel)."),
    "active_slots": ("gauge", "Slots generating now."),
    "queued_requests": ("gauge", "Admitted requests waiting for a slot: queue_depth minus "
                                 "active_slots."),
    "batch_steps_total": ("counter", "Decode steps run for several slots at once."),
    "batch_size_mean": ("gauge", "Mean slots per decode step since the server started."),
    "decode_tok_s_aggregate": ("gauge", "Tokens generated per second over all slots, the last "
                                        "10 s."),
    "kv_cache_bytes": ("gauge", "Bytes of the KV cache of all slots, allocated at start."),
}
REJECTED = ("queue_full", "context_length", "shutting_down")


def render(values: dict) -> str:
    """values: name -> number, or name -> {label value: number} (rejected_total's reasons)."""
    lines = []
    for name, value in values.items():
        kind, text = METRICS[name]
        lines += [f"# HELP edgellm_{name} {text}", f"# TYPE edgellm_{name} {kind}"]
        if isinstance(value, dict):
            lines += [f'edgellm_{name}{{reason="{label}"}} {v}' for label, v in value.items()]
        else:
            lines.append(f"edgellm_{name} {value}")
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """{'edgellm_name' or 'edgellm_name{reason="x"}': value} of a /metrics answer."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
