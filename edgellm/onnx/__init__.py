"""ONNX graphs over artifact weight files: one per decoder layer and one for the post part."""
