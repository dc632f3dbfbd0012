"""sqakd-hf: label-free quantization-aware training by self-supervised distillation (SQAKD)
for timm and transformers checkpoints."""

from .calibration import calibrate, refresh_quantizer_state
from .config import QuantConfig
from .injection import QuantizationReport, is_quantized, quant_layers, quantize_model, quantizer_parameters, quantizers
from .modules import QuantConv1D, QuantConv2d, QuantLayer, QuantLinear
from .quantizers import METHODS, Quantizer, build_quantizer

__version__ = "0.1.0"

__all__ = [
    "QuantConfig",
    "quantize_model",
    "calibrate",
    "refresh_quantizer_state",
    "QuantizationReport",
    "is_quantized",
    "quant_layers",
    "quantizers",
    "quantizer_parameters",
    "QuantLayer",
    "QuantLinear",
    "QuantConv2d",
    "QuantConv1D",
    "Quantizer",
    "build_quantizer",
    "METHODS",
]
