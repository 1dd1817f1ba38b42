"""Architecture registry: each supported family is data (an ArchSpec), looked up by name."""

from edgellm.arch.spec import ArchSpec, ModelConfig
from edgellm.arch import llama, minicpm, phi3, qwen2
from edgellm.errors import EdgeLLMError

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec for spec in (qwen2.SPEC, llama.SPEC, phi3.SPEC, minicpm.SPEC)}


def get_arch(name: str) -> ArchSpec:
    """The spec for a HF `model_type` / GGUF `general.architecture`, or a clear error."""
    spec = ARCHITECTURES.get(name)
    if spec is None:
        raise EdgeLLMError(
            f"unknown architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return spec


__all__ = ["ARCHITECTURES", "ArchSpec", "ModelConfig", "get_arch"]
