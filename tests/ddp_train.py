"""Helper for test_trainer_ddp.py (not a test): label-free SQAKD of a digits MLP.

Run with ``torchrun --nproc_per_node 2 tests/ddp_train.py --out DIR --per-device-batch 16`` or with
plain ``python`` (one process, ``--per-device-batch 32``: the same global batch). Writes, per rank,
the quantizer parameters right after calibration (``calib_rank{r}.safetensors``), the final
state (``final_rank{r}.safetensors``), and on rank 0 the logged losses (``losses.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, quantize_model, named_quantizers  # noqa: E402

torch.set_num_threads(1)


def digits_mlp() -> nn.Module:
    """No BatchNorm (batch statistics would differ between 2 x 16 and 1 x 32)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))


def quantizer_state(model: nn.Module) -> dict:
    return {f"{n}.{k}": v.detach().clone().contiguous() for n, q in named_quantizers(model) for k, v in q.named_parameters()}


class DumpCalibration(TrainerCallback):
    """on_train_begin runs after SQAKDTrainer calibrated the student and DDP wrapped it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        save_file(quantizer_state(model), self.path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--teacher", required=True, help="safetensors state dict of a trained digits_mlp()")
    p.add_argument("--data", required=True, help=".npy array (N, 1, 8, 8) of unlabeled images")
    p.add_argument("--per-device-batch", type=int, required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--cache", action="store_true", help="cache_teacher_outputs=True (cache in OUT/run/_teacher_cache)")
    a = p.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    teacher = digits_mlp()
    teacher.load_state_dict(load_file(a.teacher))
    teacher.eval()
    student = quantize_model(copy.deepcopy(teacher).train(),
                             QuantConfig(method="lsq", weight_bits=4, act_bits=4, modules_to_not_convert=[]))
    ds = datasets.Dataset.from_dict({"pixel_values": np.load(a.data)}).with_format("torch")
    args = SQAKDTrainingArguments(
        output_dir=os.path.join(a.out, "run"), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=a.per_device_batch, max_steps=a.steps, logging_steps=1, learning_rate=1e-3,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", calibration_batches=2, seed=0,
        ddp_backend="gloo" if distributed else None, cache_teacher_outputs=a.cache, per_device_eval_batch_size=8,
    )
    rank = args.process_index
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                           callbacks=[DumpCalibration(os.path.join(a.out, f"calib_rank{rank}.safetensors"))])
    trainer.train()
    state = {k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}
    save_file(state, os.path.join(a.out, f"final_rank{rank}.safetensors"))
    if rank == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(a.out, "losses.json"), "w") as f:
            json.dump({"losses": losses, "world_size": args.world_size}, f)
    trainer.end()


if __name__ == "__main__":
    main()
