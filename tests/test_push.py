"""push_to_hub against the in-process LocalHub (real huggingface_hub client over HTTP), model cards."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml

from hub_fixtures import local_hub  # noqa: F401  (pytest fixture)
from hub_server import LocalHub
from sqakd_hf import (
    QuantConfig,
    calibrate,
    from_pretrained_timm,
    model_card_info,
    push_to_hub,
    quantize_model,
    save_packed,
    save_pretrained_timm,
    write_model_card,
)
from sqakd_hf.errors import PushToHubError
from test_export import EXACT_RTOL, FP16_HEAD_RTOL, _rel_err
from test_hf_quantizer import FAMILIES, load_student, logits, save_teacher

REPO = "testuser/bert-sqakd-w4a4"
TEACHER_ID = "someorg/bert-tiny-teacher"


@pytest.fixture(scope="module")
def bert_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    family = FAMILIES["bert"]
    save_teacher(family, root / "teacher")
    student = load_student(family, root / "teacher", QuantConfig(method="lsq", weight_bits=4, act_bits=4))
    student.save_pretrained(root / "student")
    return family, student, root


def _front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _digest(folder: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_push_twice_then_load_from_hub(local_hub: LocalHub, bert_student, tmp_path: Path) -> None:
    family, student, _ = bert_student
    metrics = {"teacher": {"accuracy": 0.91}, "student": {"accuracy": 0.89}}
    info = push_to_hub(student, REPO, teacher=TEACHER_ID, metrics=metrics, training={"temperature": 4.0})
    assert info.oid == local_hub.history[REPO][-1].oid
    files = local_hub.repos[REPO]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["packed"] is True
    card = _front_matter(files["README.md"])
    assert card["base_model"] == TEACHER_ID and card["base_model_relation"] == "quantized"
    assert card["library_name"] == "transformers" and "w4a4" in card["tags"] and "lsq" in card["tags"]
    body = files["README.md"].decode()
    assert "AutoModelForSequenceClassification" in body and f'from_pretrained("{REPO}")' in body
    assert "0.8900" in body and "classifier" in body  # metrics table, FP modules listed

    # second push to the existing repository: a new commit, new card contents
    n_commits = len(local_hub.history[REPO])
    push_to_hub(student, REPO, teacher=TEACHER_ID, metrics={"student": {"accuracy": 0.9}},
                commit_message="second push")
    assert len(local_hub.history[REPO]) == n_commits + 1
    assert local_hub.history[REPO][-1].message == "second push"
    assert "0.9000" in local_hub.repos[REPO]["README.md"].decode()

    batch = family.batch()
    loaded = family.auto.from_pretrained(REPO)  # resolved and downloaded over HTTP from the LocalHub
    assert f"GET /{REPO}/resolve/{local_hub.history[REPO][-1].oid}/model.safetensors" in local_hub.requests
    assert loaded.hf_quantizer.pre_quantized and loaded.config.quantization_config.packed
    out = logits(loaded, batch)
    save_packed(student, tmp_path / "local")  # the same packed form, saved locally: identical outputs
    assert torch.equal(logits(family.auto.from_pretrained(tmp_path / "local"), batch), out)
    assert _rel_err(out, logits(student, batch)) <= FP16_HEAD_RTOL


def test_push_from_training_folder_and_timm_model(local_hub: LocalHub, bert_student, tmp_path: Path) -> None:
    family, student, root = bert_student
    before = _digest(root / "student")
    push_to_hub(root / "student", "testuser/from-folder", teacher=TEACHER_ID, fp_dtype=None)
    assert _digest(root / "student") == before  # the local folder is never modified
    loaded = family.auto.from_pretrained("testuser/from-folder")
    assert _rel_err(logits(loaded, family.batch()), logits(student, family.batch())) <= EXACT_RTOL

    torch.manual_seed(0)
    timm_student = quantize_model(timm.create_model("test_resnet", num_classes=5).eval(),
                                  QuantConfig(method="pact", weight_bits=2, act_bits=4))
    x = torch.randn(2, 3, 32, 32)
    calibrate(timm_student, [x])
    push_to_hub(timm_student, "testuser/timm-sqakd", teacher="timm/test_resnet.r160_in1k")
    card = _front_matter(local_hub.repos["testuser/timm-sqakd"]["README.md"])
    assert card["base_model"] == "timm/test_resnet.r160_in1k" and card["library_name"] == "timm"
    push_to_hub(timm_student, "timm-sqakd")  # a bare name goes to the token's namespace
    readme = local_hub.repos["testuser/timm-sqakd"]["README.md"].decode()
    assert 'sqakd_hf.from_pretrained_timm("testuser/timm-sqakd")' in readme
    loaded = from_pretrained_timm("testuser/timm-sqakd")
    with torch.no_grad():
        assert _rel_err(loaded(x), timm_student(x)) <= FP16_HEAD_RTOL


def test_failed_upload_is_a_clear_error_and_keeps_files(local_hub: LocalHub, bert_student) -> None:
    family, student, root = bert_student
    before = _digest(root / "student")
    local_hub.fail_commits = True
    with pytest.raises(PushToHubError, match=r"failed to upload the files for 'testuser/broken'") as exc_info:
        push_to_hub(root / "student", "testuser/broken", teacher=TEACHER_ID)
    message = str(exc_info.value)
    assert "retry with sqakd_hf.push_to_hub(" in message and "500" in message
    staged = exc_info.value.folder
    assert f"are kept in {staged};" in message
    assert {"config.json", "model.safetensors", "README.md"} <= {f.name for f in staged.iterdir()}
    assert _digest(root / "student") == before
    assert set(local_hub.repos["testuser/broken"]) == {".gitattributes"}  # nothing half-committed

    local_hub.fail_commits = False
    push_to_hub(staged, "testuser/broken")  # the retry the message suggests; keeps the staged card
    files = local_hub.repos["testuser/broken"]
    assert files["README.md"] == (staged / "README.md").read_bytes()
    assert _front_matter(files["README.md"])["base_model"] == TEACHER_ID
    shutil.rmtree(staged.parent)


def test_model_card_info_and_write(bert_student, tmp_path: Path) -> None:
    family, student, root = bert_student
    info = model_card_info(student, teacher=TEACHER_ID)
    assert (info.method, info.weight_bits, info.act_bits, info.library) == ("lsq", 4, 4, "transformers")
    assert info.model_class == "AutoModelForSequenceClassification" and info.pipeline_tag == "text-classification"
    assert info.fp_modules == [e.name for e in student.sqakd_report.kept_fp] and "classifier" in info.fp_modules
    assert model_card_info(student).base_model == str(root / "teacher")  # the checkpoint it was quantized from
    path = write_model_card(student, root / "student", teacher=TEACHER_ID)
    text = path.read_text()
    assert "not bit-packed" in text and "Checkpoint size" in text
    timm_model = calibrate(quantize_model(timm.create_model("test_resnet", num_classes=5), QuantConfig()),
                           [torch.randn(2, 3, 32, 32)])
    save_pretrained_timm(timm_model, tmp_path / "t", packed=True)
    text = write_model_card(timm_model, tmp_path / "t").read_text()
    assert "bit-packed, 2 per byte" in text and "timm" in text
