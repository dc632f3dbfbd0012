"""Deploy formats that other engines load without ``sqakd_hf``: compressed-tensors (transformers, vLLM)."""
