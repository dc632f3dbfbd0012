"""Sharing a quantized model: the model card and the Hub upload."""
