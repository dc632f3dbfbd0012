"""Tests for sqakd_hf.model_card (Hub model card rendering)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from sqakd_hf.hub.card import DEFAULT_TEMPLATE_PATH, ModelCardInfo, render_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_TAGS = {"sqakd", "quantized", "knowledge-distillation", "qat"}


def _info(**overrides) -> ModelCardInfo:
    kwargs = dict(
        base_model="google/vit-base-patch16-224",
        method="lsq",
        weight_bits=4,
        act_bits=8,
        fp_modules=["vit.embeddings.patch_embeddings.projection", "classifier"],
        model_class="AutoModelForImageClassification",
        library="transformers",
        repo_id="someone/vit-base-w4a8-sqakd",
        metrics={
            "teacher": {"accuracy": 0.9731, "top5": 0.9988},
            "student": {"accuracy": 0.9612, "top5": 0.9975},
        },
        checkpoint_bytes=50_000_000,
        teacher_bytes=200_000_000,
        packed=True,
        training={"lr": 1e-4, "epochs": 3, "temperature": 4.0},
        tags=["vision"],
        datasets=["beans"],
        license="apache-2.0",
        pipeline_tag="image-classification",
    )
    kwargs.update(overrides)
    return ModelCardInfo(**kwargs)


def _reparse(card: ModelCard) -> ModelCard:
    return ModelCard(card.content)


def test_template_symlink_points_to_packaged_template() -> None:
    top = REPO_ROOT / "model_card_template.md"
    assert top.is_symlink()
    assert top.resolve() == DEFAULT_TEMPLATE_PATH.resolve()
    assert DEFAULT_TEMPLATE_PATH.is_file()


def test_metadata_header() -> None:
    card = _reparse(render_model_card(_info()))
    data = card.data
    assert data.base_model == "google/vit-base-patch16-224"
    assert data.base_model_relation == "quantized"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-classification"
    assert data.license == "apache-2.0"
    assert data.datasets == ["beans"]
    assert BASE_TAGS | {"4-bit", "vision", "image-classification"} <= set(data.tags)
    assert len(data.tags) == len(set(data.tags))


def test_body_with_metrics() -> None:
    text = _reparse(render_model_card(_info())).text
    assert "W4A8" in text
    assert "`lsq`" in text
    assert "`vit.embeddings.patch_embeddings.projection`, `classifier`" in text
    assert "https://huggingface.co/google/vit-base-patch16-224" in text
    # metrics table: teacher vs student with deltas
    assert re.search(r"\| Metric \| teacher \| student \|", text)
    assert "| accuracy | 0.9731 | 0.9612 | -0.0119 |" in text
    assert "| top5 | 0.9988 | 0.9975 | -0.0013 |" in text
    # size vs teacher
    assert "50.00 MB vs 200.00 MB full precision: 4.00x smaller, 25.0% of the full-precision size" in text
    assert "bit-packed, 2 per byte" in text
    # training hyper-parameters
    assert "| lr | 0.0001 |" in text
    assert "| epochs | 3 |" in text


def test_loading_snippet_imports_sqakd_hf_first() -> None:
    text = render_model_card(_info()).text
    code = text.split("```python", 1)[1].split("```", 1)[0]
    assert "import sqakd_hf" in code
    assert code.index("import sqakd_hf") < code.index("from_pretrained")
    assert 'AutoModelForImageClassification.from_pretrained("someone/vit-base-w4a8-sqakd")' in code
    assert 'quantization method `"sqakd"`' in text  # the one-sentence explanation


def test_citation() -> None:
    text = render_model_card(_info()).text
    assert "```bibtex" in text
    assert "@inproceedings{zhao2024sqakd" in text
    assert "Self-Supervised Quantization-Aware Knowledge Distillation" in text
    assert "Zhao, Kaiqi and Zhao, Ming" in text
    assert "AISTATS" in text and "2024" in text and "2403.11106" in text


def test_without_metrics_sizes_or_training() -> None:
    info = _info(metrics={}, checkpoint_bytes=None, teacher_bytes=None, training={}, packed=False)
    card = _reparse(render_model_card(info))
    assert card.data.base_model == "google/vit-base-patch16-224"
    assert card.data.base_model_relation == "quantized"
    assert "## Evaluation" not in card.text
    assert "| Metric |" not in card.text
    assert "Checkpoint size" not in card.text
    assert "## Training hyper-parameters" not in card.text
    assert "not bit-packed" in card.text
    assert "## How to load" in card.text and "## Citation" in card.text


def test_size_without_teacher_size() -> None:
    text = render_model_card(_info(teacher_bytes=None)).text
    assert "**Checkpoint size (measured):** 50.00 MB" in text
    assert "smaller" not in text


def test_student_only_metrics_have_no_delta() -> None:
    text = render_model_card(_info(metrics={"student": {"accuracy": 0.5}})).text
    assert "| accuracy | 0.5000 |" in text
    assert "Δ" not in text


def test_timm_snippet() -> None:
    info = _info(library="timm", model_class="timm", base_model="timm/resnet18.a1_in1k",
                 repo_id="someone/resnet18-w2a2", weight_bits=2, act_bits=2)
    card = _reparse(render_model_card(info))
    assert card.data.library_name == "timm"
    assert "2-bit" in card.data.tags
    code = card.text.split("```python", 1)[1].split("```", 1)[0]
    assert code.index("import sqakd_hf") < code.index("from_pretrained")
    assert 'sqakd_hf.from_pretrained_timm("someone/resnet18-w2a2")' in code
    assert "4 per byte" in card.text


def test_local_teacher_path_not_in_metadata() -> None:
    card = _reparse(render_model_card(_info(base_model="/tmp/teacher_ckpt", repo_id=None)))
    assert card.data.base_model is None
    assert getattr(card.data, "base_model_relation", None) is None
    assert "`/tmp/teacher_ckpt`" in card.text
    assert 'from_pretrained("path/to/this/checkpoint")' in card.text


def test_custom_template(tmp_path: Path) -> None:
    tpl = tmp_path / "t.md"
    tpl.write_text("---\n{{ card_data }}\n---\n\nCustom W{{ weight_bits }}A{{ act_bits }}\n")
    card = render_model_card(_info(), template_path=str(tpl))
    assert card.text.strip() == "Custom W4A8"
    assert card.data.base_model_relation == "quantized"


def test_invalid_library() -> None:
    with pytest.raises(ValueError, match="library"):
        render_model_card(_info(library="onnx"))


def test_loading_advice_matches_what_transformers_does_without_the_import():
    """Without ``import sqakd_hf`` a packed folder loads with random quantized weights, a training-form
    folder as plain FP weights: the card says which, for transformers models."""
    for packed, says in ((True, "size-mismatch error"), (False, "full-precision master weights")):
        card = str(render_model_card(ModelCardInfo(base_model="org/teacher", method="lsq", weight_bits=4, act_bits=4,
                                                   packed=packed)))
        assert says in card and "import sqakd_hf" in card, packed


# ---- the rendered card of real runs, field by field against each run's record --------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs of the CLI: a text classifier with labeled eval files (max_steps ends it inside the first
    epoch), a timm model without eval data (whole epochs), and a PTQ run."""
    from cli_fixtures import (image_recipe, save_bert_teacher, save_timm_teacher, write_digits_imagefolder,
                              write_recipe, write_text_csv)
    from sqakd_hf.app.cli import main

    root = tmp_path_factory.mktemp("card-runs")
    bert, timm_teacher = save_bert_teacher(root / "bert-teacher"), save_timm_teacher(root / "timm-teacher")
    train = write_text_csv(root / "text" / "train.csv", 40, with_labels=False)
    evals = write_text_csv(root / "text" / "eval.csv", 12, seed=1)
    imgs = write_digits_imagefolder(root / "digits", n_train=32, n_test=16)
    common = dict(save_strategy="no", report_to="none", disable_tqdm=True, calibration_batches=1)
    text = write_recipe(root / "text.yaml", teacher=str(bert), train_files=str(train), eval_files=str(evals),
                        max_length=16, output_dir=str(root / "text-run"), max_steps=3, per_device_train_batch_size=8,
                        **common)
    assert main(["train", str(text)]) == 0
    vision = image_recipe(root, timm_teacher, imgs, eval_split=None, max_steps=-1, num_train_epochs=1,
                          output_dir=str(root / "timm-run"), weight_bits=2, act_bits=2, quantizer_lr_mode="relative")
    assert main(["train", str(write_recipe(root / "timm.yaml", **vision))]) == 0
    ptq = image_recipe(root, timm_teacher, imgs, output_dir=str(root / "ptq-run"), method="minmax", weight_bits=8,
                       act_bits=8)
    assert main(["ptq", str(write_recipe(root / "ptq.yaml", **ptq))]) == 0
    return root


@pytest.mark.parametrize("run", ["text-run", "timm-run", "ptq-run"])
def test_card_of_a_real_run_matches_its_record(runs, run):
    from cli_fixtures import check_card_against_record

    record = check_card_against_record(runs / run)
    result = record["result"]
    if run == "text-run":
        assert result["mode"] == "train" and result["optimizer_steps"] == 3
        assert result["hyperparameters"]["quantizer_lr_mode"] == "auto"  # the default, on the card too
        assert result["epochs"] == pytest.approx(0.6)  # 3 steps of 8 out of 40 examples, not "epochs 3"
        assert result["eval"] == {"files": [str(runs / "text" / "eval.csv")], "split": "eval.csv", "examples": 12,
                                  "metrics": ["accuracy", "kd_loss", "teacher_agreement"]}
    elif run == "timm-run":
        assert result["mode"] == "train" and result["eval"] is None
        assert result["epochs"] == pytest.approx(1.0) and result["optimizer_steps"] == 2  # 32 images, batch 16
        assert result["hyperparameters"]["quantizer_lr_mode"] == "relative"  # the recipe's choice, on the card too
    else:
        assert result["mode"] == "ptq" and result["optimizer_steps"] == 0 and result["epochs"] == 0
        assert result["eval"]["split"] == "test" and result["eval"]["examples"] == 16
        assert record["sources"]["eval"]["dataset"] == str(runs / "digits")


def test_card_says_where_the_bytes_are(runs):
    """The packed timm student: the FP groups and the quantized share add up to the whole file."""
    text = (runs / "timm-run" / "packed" / "README.md").read_text()
    shares = [float(s) for s in re.findall(r"\| ([\d.]+)% \|", text)]
    quantized = float(re.search(r"Quantized layers \(integer codes and their scales\): ([\d.]+)%", text).group(1))
    small = text.count("| <0.1% |")
    assert abs(sum(shares) + quantized - 100) <= 0.05 * (len(shares) + 1) + 0.1 * small


def test_fp_groups_follow_what_is_actually_quantized(tmp_path):
    """The groups come from the saved file: with 4-bit embeddings the embeddings leave the FP list."""
    from transformers import AutoModelForSequenceClassification

    from cli_fixtures import save_bert_teacher, tiny_bert_tokenizer
    from sqakd_hf import QuantConfig, calibrate
    from sqakd_hf.checkpoint import save_packed
    from sqakd_hf.hub.card_info import checkpoint_contents

    teacher = save_bert_teacher(tmp_path / "t")
    batch = dict(tiny_bert_tokenizer()(["the movie was great", "awful plot"], padding=True, return_tensors="pt"))
    found = {}
    for name, extra in (("linear", {}), ("embeddings", {"embedding_bits": 4})):
        model = AutoModelForSequenceClassification.from_pretrained(teacher, quantization_config=QuantConfig(
            method="lsq", weight_bits=4, act_bits=8, **extra))
        calibrate(model, [batch])
        save_packed(model, tmp_path / name)
        contents = checkpoint_contents(tmp_path / name)
        assert contents["total_bytes"] == sum(  # every byte of tensor data is accounted for
            g["bytes"] for g in contents["fp_groups"]) + contents["quantized_bytes"]
        found[name] = contents
    groups = {g["group"] for g in found["linear"]["fp_groups"]}
    assert {"bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"} <= groups
    groups = {g["group"] for g in found["embeddings"]["fp_groups"]}
    assert not any("_embeddings" in g for g in groups) and "bert.embeddings.LayerNorm" in groups
    share = lambda c: c["quantized_bytes"] / c["total_bytes"]  # noqa: E731
    assert share(found["embeddings"]) > share(found["linear"]) + 0.2


def _snippet(card: str) -> str:
    return re.search(r"## How to load\n.*?```python\n(.*?)```", card, re.S).group(1)


def test_compressed_tensors_card_loads_with_plain_transformers() -> None:
    card = str(render_model_card(_info(form="compressed-tensors")))
    snippet = _snippet(card)
    assert "import sqakd_hf" not in card and "pip install transformers compressed-tensors" in snippet
    assert 'AutoModelForImageClassification.from_pretrained("someone/vit-base-w4a8-sqakd")' in snippet
    assert 'AutoImageProcessor.from_pretrained("someone/vit-base-w4a8-sqakd")' in snippet and "vllm" not in card
    assert "**Format:** compressed-tensors" in card and "4x smaller" not in card and "4.00x smaller" in card
    meta = ModelCard(card).data.to_dict()
    assert meta["base_model_relation"] == "quantized" and "compressed-tensors" in meta["tags"]
    with pytest.raises(ValueError, match="compressed-tensors form is for transformers"):
        render_model_card(_info(form="compressed-tensors", library="timm", model_class="resnet18"))
    with pytest.raises(ValueError, match="form must be one of"):
        render_model_card(_info(form="gguf"))


def test_onnx_card_runs_in_onnxruntime_and_says_when_the_file_is_larger() -> None:
    card = str(render_model_card(_info(form="onnx", library="timm", model_class="resnet18",
                                       checkpoint_bytes=300_000_000)))
    snippet = _snippet(card)
    assert 'ort.InferenceSession(hf_hub_download("someone/vit-base-w4a8-sqakd", "model.onnx"), options)' in snippet
    assert 'options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")' in snippet
    assert "np.zeros([1, *image.shape[1:]], np.float32)" in snippet and "sqakd_hf" not in snippet
    assert "ONNX file size (measured):** 300.00 MB vs 200.00 MB full precision: 1.50x larger, 150.0%" in card
    assert "preprocessing (mean, std, input size)" in card and "onnx" in ModelCard(card).data.to_dict()["tags"]
    text = _snippet(str(render_model_card(_info(form="onnx", pipeline_tag="text-classification",
                                                model_class="AutoModelForSequenceClassification"))))
    assert "AutoTokenizer" in text and "feeds = {i.name: inputs[i.name] for i in session.get_inputs()}" in text
