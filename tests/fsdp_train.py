"""Helper for test_trainer_fsdp.py (not a test): label-free SQAKD of a random-init tiny Llama under FSDP2.

Two modes:

* through the Trainer (GPUs): ``accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes N
  tests/fsdp_train.py --out DIR [--resume]``. Writes per rank the quantizer parameters right after calibration
  (``calib_rank{r}.safetensors``), on rank 0 the logged losses (``losses.json``); the trainer saves checkpoints
  (``run/checkpoint-*``) and the final model (``final``).
* ``--raw`` (CPU, gloo): torch's ``fully_shard`` applied by hand to the calibrated student, launched with
  ``torchrun --nproc_per_node 2`` or plain ``python`` (one process, no sharding, the same global batch). Writes the
  losses and the gathered full state dict (``raw_losses.json``, ``raw_state.safetensors``, rank 0). The quantizers'
  per-tensor parameters are 1-element 1-D tensors, so ``fully_shard`` (which refuses 0-dim parameters) takes them.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402

from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, named_quantizers, quantize_model  # noqa: E402

torch.set_num_threads(1)
SEQ, VOCAB = 16, 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                        tie_word_embeddings=False))


def token_data(n: int = 64) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
                                      ).with_format("torch")


def quantizer_state(model) -> dict:
    out = {}
    for n, q in named_quantizers(model):
        for k, v in q.named_parameters():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[f"{n}.{k}"] = v.detach().clone().contiguous()
    return out


class DumpCalibration(TrainerCallback):
    """on_train_begin runs after calibration (and after FSDP sharded the student: gathered full tensors here)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        save_file(quantizer_state(model), self.path)


def raw(a: argparse.Namespace) -> None:
    """SQAKD steps on a student sharded with ``fully_shard`` (each decoder layer, then the root), gloo on CPU."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from sqakd_hf import calibrate, kd_kl_loss

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    teacher = tiny_llama().eval()
    student = quantize_model(tiny_llama().train(), QuantConfig(method="lsq", weight_bits=4, act_bits=8))
    ids = token_data(8 * (a.steps + 1))[:]["input_ids"]
    calibrate(student, [{"input_ids": ids[:8]}])  # the same batch on every rank: identical quantizers
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
    opt = torch.optim.AdamW(student.parameters(), 1e-3)
    losses = []
    for step in range(a.steps):
        local = ids[8 * (step + 1) : 8 * (step + 2)][rank::world]  # this rank's half of the global batch of 8
        with torch.no_grad():
            target = teacher(input_ids=local).logits
        loss = kd_kl_loss(student(input_ids=local).logits, target, 4.0)
        loss.backward()  # FSDP averages the gradients over ranks: equal token counts = the global batch's mean
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)
    state = (get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
             if distributed else student.state_dict())
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(a.out, "raw_state.safetensors"))
        with open(os.path.join(a.out, "raw_losses.json"), "w") as f:
            json.dump({"losses": losses, "world_size": world}, f)
    if distributed:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--raw", action="store_true", help="fully_shard by hand (CPU/gloo), no Trainer")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.raw:
        return raw(a)
    teacher = tiny_llama().eval()
    student = quantize_model(tiny_llama().train(), QuantConfig(method="lsq", weight_bits=4, act_bits=8))
    args = SQAKDTrainingArguments(
        output_dir=os.path.join(a.out, "run"), report_to="none", save_strategy="steps", save_steps=2,
        disable_tqdm=True, per_device_train_batch_size=4, max_steps=a.steps, logging_steps=1, learning_rate=1e-3,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", calibration_batches=2, seed=0,
        save_only_model=False, ddp_backend=None if torch.cuda.is_available() else "gloo",
    )
    rank = args.process_index
    trainer = SQAKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=token_data(),
                           callbacks=[DumpCalibration(os.path.join(a.out, f"calib_rank{rank}.safetensors"))])
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    trainer.save_model(os.path.join(a.out, "final"))
    if rank == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(a.out, "losses.json"), "w") as f:
            json.dump({"losses": losses, "world_size": args.world_size, "global_step": trainer.state.global_step,
                       "fsdp": trainer.is_fsdp_enabled}, f)


if __name__ == "__main__":
    main()
