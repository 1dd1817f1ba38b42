"""edgellm: compile small LLMs into per-layer edge artifacts and run them on a CPU."""

__version__ = "0.1.0"
