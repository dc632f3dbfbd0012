"""On-disk formats: bit packing, our packed low-bit form, timm's Hub layout, safetensors files."""
