"""FSDP2 with a quantized causal-LM student (random-init tiny Llama).

On CPU: accelerate (1.15) enables FSDP only for GPU-type backends (its state sets DistributedType.FSDP for
MULTI_GPU/NPU/XPU/..., never MULTI_CPU), so ``accelerate launch --config_file recipes/accelerate/fsdp.yaml``
cannot shard on a CPU-only machine. torch's FSDP2 itself runs on CPU over gloo, so the CPU tests apply
``fully_shard`` by hand (tests/fsdp_train.py --raw) and compare with one unsharded process at the same global
batch. The Trainer path through the recipe runs where CUDA GPUs exist (test_accelerate_fsdp_recipe).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")


def _raw(out: Path, world: int, *extra: str) -> subprocess.CompletedProcess:
    script = [str(HERE / "fsdp_train.py"), "--raw", "--out", str(out), *extra]
    if world == 1:
        return _run([sys.executable, *script])
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
                 "127.0.0.1", "--master_port", str(_free_port()), *script])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_single")
    _ok(_raw(out, 1))
    return out


def test_quantized_student_has_no_scalar_parameters():
    """fully_shard refuses 0-dim parameters: every quantizer parameter of every method is at least 1-D."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sqakd_hf import QuantConfig, quantize_model

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2)
    for method in ("lsq", "pact", "ewgs", "dorefa", "minmax"):
        for granularity in ("per_tensor", "per_channel"):
            student = quantize_model(LlamaForCausalLM(config), QuantConfig(method=method, weight_bits=4, act_bits=8,
                                                               weight_granularity=granularity))
            assert [n for n, p in student.named_parameters() if p.dim() == 0] == [], (method, granularity)


def test_fsdp2_on_cpu_matches_one_process(single, tmp_path):
    """2 processes, student sharded per decoder layer (fully_shard over the quantizers' per-tensor parameters, held
    as 1-element 1-D tensors), nothing reshaped by hand: losses and the gathered full state equal one unsharded
    process at the same global batch (tolerances: losses 1e-3 relative, weights 1e-4 absolute, 4 AdamW steps)."""
    _ok(_raw(tmp_path, 2))
    ref = json.loads((single / "raw_losses.json").read_text())
    got = json.loads((tmp_path / "raw_losses.json").read_text())
    assert ref["world_size"] == 1 and got["world_size"] == 2
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-3)
    a, b = load_file(str(single / "raw_state.safetensors")), load_file(str(tmp_path / "raw_state.safetensors"))
    assert a.keys() == b.keys() and any("quantizer" in k for k in a)
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"\nFSDP2 (2 x 4) vs one process (8): losses {got['losses']} vs {ref['losses']}; max |diff| weights {worst:.1e}")
    assert worst < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate enables FSDP only with GPUs (see module doc)")
def test_accelerate_fsdp_recipe(tmp_path):
    """The Trainer under ``accelerate launch --config_file recipes/accelerate/fsdp.yaml``: calibration identical on
    every rank, checkpoints, resume, and the saved model reloads and packs."""
    n = min(2, torch.cuda.device_count())
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp.yaml",
              "--num_processes", str(n), "--main_process_port", str(_free_port()), str(HERE / "fsdp_train.py"),
              "--out", str(tmp_path)]
    _ok(_run([*launch, "--steps", "4"]))
    first = json.loads((tmp_path / "losses.json").read_text())
    assert first["fsdp"] and first["world_size"] == n and first["global_step"] == 4
    calib = [load_file(str(tmp_path / f"calib_rank{r}.safetensors")) for r in range(n)]
    for k in calib[0]:
        assert all(torch.equal(c[k], calib[0][k]) for c in calib), k
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    _ok(_run([*launch, "--steps", "6", "--resume"]))
    resumed = json.loads((tmp_path / "losses.json").read_text())
    assert resumed["global_step"] == 6 and all(torch.isfinite(torch.tensor(resumed["losses"])))

    from sqakd_hf.checkpoint import load_quantized, save_packed

    model = load_quantized(tmp_path / "final")
    ids = torch.randint(1, 64, (2, 16))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        packed = load_quantized(save_packed(model, tmp_path / "packed"))
        torch.testing.assert_close(packed(input_ids=ids).logits, want, rtol=1e-2, atol=1e-2)
