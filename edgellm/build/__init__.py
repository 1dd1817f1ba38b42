"""The compiler: read a source checkpoint (HF directory or GGUF), write an edgellm artifact."""
