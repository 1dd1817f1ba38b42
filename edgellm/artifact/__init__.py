"""The on-disk artifact: format constants, the manifest, a streaming writer and an mmap reader."""

from edgellm.artifact.format import FORMAT_VERSION, SUPPORTED_VERSIONS, Manifest
from edgellm.artifact.reader import Artifact, load_artifact
from edgellm.artifact.writer import TensorFileWriter

__all__ = ["FORMAT_VERSION", "SUPPORTED_VERSIONS", "Manifest", "Artifact", "load_artifact",
           "TensorFileWriter"]
