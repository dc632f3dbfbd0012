"""sqakd-hf: label-free quantization-aware training by self-supervised distillation (SQAKD)
for timm and transformers checkpoints."""

from .calibration import calibrate, refresh_quantizer_state
from .config import QuantConfig
from .injection import QuantizationReport, is_quantized, quant_layers, quantize_model, quantizer_parameters, quantizers
from .modules import QuantConv1D, QuantConv2d, QuantLayer, QuantLinear
from .quantizers import METHODS, Quantizer, build_quantizer
from .losses import hidden_state_loss, kd_kl_loss, kd_kl_per_position
from .trainer import SQAKDTrainer, load_teacher
from .training_args import SQAKDTrainingArguments
from . import hf_quantizer  # registers quant_method "sqakd" with transformers
from .hf_quantizer import SQAKDHfQuantizer
from .export import SQAKDCheckpointError, pack_model, save_packed
from .timm_io import from_pretrained_timm, save_pretrained_timm
from .hub import PushToHubError, model_card_info, push_to_hub, write_model_card
from .data import load_digits_splits

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
    "SQAKDTrainer",
    "SQAKDTrainingArguments",
    "load_teacher",
    "kd_kl_loss",
    "kd_kl_per_position",
    "hidden_state_loss",
    "SQAKDHfQuantizer",
    "pack_model",
    "save_packed",
    "from_pretrained_timm",
    "save_pretrained_timm",
    "model_card_info",
    "write_model_card",
    "push_to_hub",
    "load_digits_splits",
    "SQAKDCheckpointError",
    "PushToHubError",
]
