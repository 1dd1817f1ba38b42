"""Architecture registry: each supported family is data (an ArchSpec), looked up by name."""

from edgellm.arch.spec import ArchSpec, ModelConfig
from edgellm.arch import gemma3, llama, minicpm, phi3, qwen2, qwen3
from edgellm.errors import EdgeLLMError

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec for spec in (qwen2.SPEC, qwen3.SPEC, llama.SPEC, phi3.SPEC, minicpm.SPEC,
                                 gemma3.SPEC)}
# other names sources use for a family here (transformers' text-only Gemma 3 checkpoints)
ALIASES = {"gemma3_text": "gemma3"}


def get_arch(name: str) -> ArchSpec:
    """The spec for a HF `model_type` / GGUF `general.architecture`, or a clear error."""
    spec = ARCHITECTURES.get(ALIASES.get(name, name))
    if spec is None:
        raise EdgeLLMError(
            f"unknown architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return spec


__all__ = ["ARCHITECTURES", "ArchSpec", "ModelConfig", "get_arch"]
