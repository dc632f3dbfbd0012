"""Size: bytes of the packed checkpoint (``sqakd_hf.save_packed``) at each weight bit-width
vs the FP32 safetensors checkpoint, for timm resnet18 and the MiniLM-L6 classifier."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from sqakd_hf import QuantConfig, calibrate, quantize_model, save_packed
from sqakd_hf.injection import quant_layers


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _fp32_bytes(model: nn.Module, folder: Path) -> int:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "model.safetensors"))
    return _weights_bytes(folder)


def measure(name: str, fp: nn.Module, batch: Any, bits: Sequence[int], act_bits: int, log=print) -> Dict[str, Any]:
    """FP32 bytes, then packed bytes and the share of weights that are quantized, per weight bit-width."""
    with tempfile.TemporaryDirectory(prefix="sqakd-size-") as tmp:
        fp_bytes = _fp32_bytes(fp, Path(tmp) / "fp32")
        total = sum(p.numel() for p in fp.parameters())
        rows: List[Dict[str, Any]] = []
        for b in bits:
            cfg = QuantConfig(method="lsq", weight_bits=b, act_bits=act_bits)
            q = calibrate(quantize_model(copy.deepcopy(fp), cfg), [batch])
            qparams = sum(layer.weight.numel() for _, layer in quant_layers(q))
            packed = _weights_bytes(save_packed(q, Path(tmp) / f"w{b}"))
            rows.append({"weight_bits": b, "packed_bytes": packed, "ratio_vs_fp32": fp_bytes / packed,
                         "quantized_weight_share": qparams / total})
            log(f"[size] {name} W{b}: {packed / 1e6:.2f} MB ({fp_bytes / packed:.1f}x smaller than FP32)")
    return {"model": name, "params": total, "fp32_bytes": fp_bytes, "rows": rows}


def run(bits: Sequence[int], log=print) -> List[Dict[str, Any]]:
    import timm
    from transformers import AutoModelForSequenceClassification

    from .quality_text import model_dir

    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=1000).eval()
    bert = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=5).eval()
    tokens = {"input_ids": torch.randint(1000, 30000, (2, 32)), "attention_mask": torch.ones(2, 32, dtype=torch.long)}
    return [
        measure("timm resnet18 (11.7M params)", resnet, torch.randn(2, 3, 64, 64), bits, 8, log),
        measure("all-MiniLM-L6-v2 classifier (22.7M params)", bert, tokens, bits, 8, log),
    ]
