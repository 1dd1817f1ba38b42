"""Weight quantization schemes: a registry of named, frozen dataclasses with numpy references."""

from edgellm.quant.schemes import SCHEMES, FloatScheme, GroupwiseIntScheme, get_scheme

__all__ = ["SCHEMES", "FloatScheme", "GroupwiseIntScheme", "get_scheme"]
