"""The runtime: numpy reference engine, KV cache, sampler, generator."""
