"""Chat templates (rendered from the artifact) and, later, tool-call parsing."""
