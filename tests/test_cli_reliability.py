"""``sqakd-hf`` under failure: a run killed while writing a checkpoint resumes from the newest complete
one; a failed run does not block its corrected rerun while a finished run stays protected; every bad
input is one line on stderr with exit status 2 before any model loads (and nothing is written)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli_fixtures import (
    image_recipe,
    save_bert_teacher,
    save_timm_teacher,
    write_digits_imagefolder,
    write_recipe,
    write_text_csv,
)
from sqakd_hf.app.cli import RUN_RECORD, main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    text = root / "text"
    write_text_csv(text / "train.csv", 32)
    labels_only = root / "labels-only"
    labels_only.mkdir()
    (labels_only / "train.csv").write_text("label\n" + "".join(f"{i % 2}\n" for i in range(16)))
    no_config = root / "no-config-teacher"
    shutil.copytree(save_timm_teacher(root / "timm-teacher"), no_config)
    (no_config / "config.json").unlink()
    return SimpleNamespace(imgs=write_digits_imagefolder(root / "digits", n_train=48, n_test=16),
                           timm_teacher=root / "timm-teacher", bert_teacher=save_bert_teacher(root / "bert-teacher"),
                           text=text, labels_only=labels_only, no_config=no_config)


def _error_line(err: str, command: str = "train") -> str:
    """The one error line on stderr (progress bars of data loading may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"sqakd-hf {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _expect(line: str, expected) -> None:
    for text in (expected,) if isinstance(expected, str) else expected:
        assert text in line, line


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a teacher or student is loaded (every input check must come first)."""
    def boom(*args, **kwargs):
        pytest.fail("a model was loaded before the input was checked")

    monkeypatch.setattr("sqakd_hf.app.train.load_fp_teacher", boom)
    monkeypatch.setattr("sqakd_hf.app.evaluate.load_fp_teacher", boom)


@pytest.fixture
def resumed_from(monkeypatch):
    """The ``resume_from_checkpoint`` each ``SQAKDTrainer.train`` call receives (the call itself runs)."""
    from sqakd_hf.training.trainer import SQAKDTrainer

    calls = []
    original = SQAKDTrainer.train

    def train(self, resume_from_checkpoint=None, **kwargs):
        calls.append(resume_from_checkpoint)
        return original(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(SQAKDTrainer, "train", train)
    return calls


# ---- crash-safe runs ----------------------------------------------------------------------------------------
def test_resume_skips_a_checkpoint_killed_while_being_written(assets, tmp_path, capsys, resumed_from):
    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs, max_steps=4, save_strategy="steps",
                          save_steps=2, eval_split=None, save_packed=False)
    recipe = write_recipe(tmp_path / "r.yaml", **values)
    out = tmp_path / "out"
    assert main(["train", str(recipe)]) == 0
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    # the kill: checkpoint-4 has its weights, but the Trainer never got to write its trainer_state.json
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    capsys.readouterr()

    assert main(["train", str(recipe), "--resume_from_checkpoint", "true"]) == 0
    assert resumed_from[-1] == str(out / "checkpoint-2")
    notes = [line for line in capsys.readouterr().err.splitlines() if "skipping incomplete" in line]
    assert notes == ["sqakd: resume_from_checkpoint: skipping incomplete checkpoint-4 (no trainer_state.json); "
                     "resuming from checkpoint-2"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())  # rewritten by the resumed run
    assert state["global_step"] == 4
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "complete"

    # an explicit path to an incomplete checkpoint: one line, with the way forward
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    assert main(["train", str(recipe), "--resume_from_checkpoint", str(out / "checkpoint-4")]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "checkpoint-4' is incomplete (no trainer_state.json)" in line and "--resume_from_checkpoint true" in line
    # no complete checkpoint at all
    for name in ("checkpoint-2", "checkpoint-4"):
        (out / name / "model.safetensors").unlink(missing_ok=True)
    assert main(["train", str(recipe), "--resume_from_checkpoint", "last"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "holds no complete checkpoint-* folder" in line and "checkpoint-2: no weights file" in line


def test_a_failed_run_does_not_block_its_corrected_rerun(assets, tmp_path, capsys, monkeypatch):
    from sqakd_hf.training.trainer import SQAKDTrainer

    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs, max_steps=2, eval_split=None,
                          save_packed=False)
    recipe = write_recipe(tmp_path / "r.yaml", **values)
    out = tmp_path / "out"

    def crash(self, *args, **kwargs):
        raise FloatingPointError("loss is NaN")  # a run that dies in training

    with monkeypatch.context() as patch:
        patch.setattr(SQAKDTrainer, "train", crash)
        with pytest.raises(FloatingPointError):
            main(["train", str(recipe)])
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "incomplete"

    # the corrected rerun (other settings, same output_dir) runs without overwrite_output_dir
    assert main(["train", str(recipe), "--weight_bits", "2"]) == 0
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["status"] == "complete" and record["recipe"]["weight_bits"] == 2
    capsys.readouterr()
    # a finished run stays protected
    assert main(["train", str(recipe), "--weight_bits", "4"]) == 2
    assert "holds a different run (weight_bits: 2 -> 4)" in _error_line(capsys.readouterr().err)

    # an unfinished run that left a complete checkpoint is not replaced silently either
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-2" / "model.safetensors").write_bytes(b"")
    (out / RUN_RECORD).write_text(json.dumps({**record, "status": "incomplete"}))
    assert main(["train", str(recipe)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "holds an unfinished run (newest complete checkpoint: checkpoint-2; weight_bits: 2 -> 4)" in line
    assert "--resume_from_checkpoint true" in line


# ---- every bad input: one line, exit 2, before any model loads ----------------------------------------------
BAD_VALUES = {
    "negative batch size": ({"per_device_train_batch_size": -1}, "per_device_train_batch_size must be an integer >= 1"),
    "zero eval batch size": ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size must be an integer >= 1"),
    "zero accumulation": ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
    "NaN learning rate": ({"learning_rate": math.nan}, ("learning_rate must be a finite number", "got nan")),
    "negative learning rate": ({"learning_rate": -1e-3}, "learning_rate must be a finite number >= 0.0"),
    "infinite weight decay": ({"weight_decay": math.inf}, ("weight_decay must be a finite number", "got inf")),
    "NaN kd_weight": ({"kd_weight": math.nan}, "kd_weight must be a finite number"),
    "infinite temperature": ({"temperature": math.inf}, ("temperature must be", "inf")),
    "max_steps below -1": ({"max_steps": -5}, "max_steps must be an integer >= -1"),
    "no epochs": ({"max_steps": -1, "num_train_epochs": 0}, "num_train_epochs must be a finite number > 0.0"),
    "infinite epochs": ({"max_steps": -1, "num_train_epochs": math.inf}, "num_train_epochs must be a finite number"),
    "negative seed": ({"seed": -1}, "seed must be an integer in 0..4294967295"),
    "negative quantizer lr": ({"quantizer_learning_rate": -1.0}, "quantizer_learning_rate must be"),
    "layer_bits matching nothing": ({"layer_bits": {"no_such_layer": 8}},
                                    "layer_bits pattern 'no_such_layer' matches no quantizable layer; quantizable "
                                    "layers are: conv1.0"),
    "modules_to_not_convert matching nothing": ({"modules_to_not_convert": ["nothing_here"]},
                                                "modules_to_not_convert pattern 'nothing_here' matches no quantizable"),
    "dataset with only labels": ({"dataset_name": "{labels_only}", "eval_split": None},
                                 "has no image column: it holds only labels (label); SQAKD needs the inputs"),
    "teacher folder without config.json": ({"teacher": "{no_config}"}, "has no config.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_are_one_line_before_any_model_loads(case, assets, tmp_path, capsys, no_model_loads):
    change, expected = BAD_VALUES[case]
    subst = {"labels_only": str(assets.labels_only), "no_config": str(assets.no_config)}
    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs)
    values.update({k: (v.format(**subst) if isinstance(v, str) else v) for k, v in change.items()})
    recipe = write_recipe(tmp_path / "bad.yaml", **{k: v for k, v in values.items() if v is not None})
    assert main(["train", str(recipe)]) == 2
    _expect(_error_line(capsys.readouterr().err), expected)
    assert not (tmp_path / "out").exists()


BAD_OVERRIDES = {
    "NaN override": (["--learning_rate", "nan"], ("learning_rate must be a finite number", "got nan")),
    "inf override": (["--max_grad_norm", "inf"], ("max_grad_norm must be a finite number", "got inf")),
    "malformed list": (["--modules_to_not_convert", "[a"], "modules_to_not_convert: '[a' is not a valid YAML/JSON list"),
    "malformed mapping": (["--layer_bits", "{fc: "], "layer_bits: '{fc: ' is not valid YAML/JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_bad_overrides_are_one_line(case, assets, tmp_path, capsys, no_model_loads):
    tokens, expected = BAD_OVERRIDES[case]
    recipe = write_recipe(tmp_path / "r.yaml", **image_recipe(tmp_path, assets.timm_teacher, assets.imgs))
    assert main(["train", str(recipe), *tokens]) == 2
    _expect(_error_line(capsys.readouterr().err), expected)
    assert not (tmp_path / "out").exists()


def test_malformed_recipe_yaml_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("teacher: t\nlayer_bits: {fc: 8\n")
    assert main(["train", str(recipe)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "is not valid YAML" in line and "line 3" in line


def test_transformers_patterns_are_checked_on_a_meta_skeleton(assets, tmp_path, capsys, no_model_loads):
    recipe = write_recipe(tmp_path / "t.yaml", teacher=str(assets.bert_teacher), dataset_name=str(assets.text),
                          output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", save_strategy="no",
                          layer_bits={"no_such_block": 8})
    assert main(["train", str(recipe)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "layer_bits pattern 'no_such_block' matches no quantizable layer" in line
    assert "bert.encoder.layer.0.attention" in line
    assert not (tmp_path / "out").exists()


def test_text_dataset_with_only_labels(assets, tmp_path, capsys, no_model_loads):
    recipe = write_recipe(tmp_path / "t.yaml", teacher=str(assets.bert_teacher),
                          dataset_name=str(assets.labels_only), output_dir=str(tmp_path / "out"), max_steps=1)
    assert main(["train", str(recipe)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "has no text column: it holds only labels (label)" in line and "Available columns: label" in line


def test_eval_bad_values(assets, tmp_path, capsys, no_model_loads):
    assert main(["eval", "--model_path", str(tmp_path), "--batch_size", "0"]) == 2
    assert "batch_size must be an integer >= 1; got 0" in _error_line(capsys.readouterr().err, "eval")
    assert main(["eval", "--model_path", str(tmp_path), "--temperature", "nan"]) == 2
    assert "temperature must be a finite number > 0; got nan" in _error_line(capsys.readouterr().err, "eval")


# ---- eval of a saved model whose config.json contradicts its weights ----------------------------------------
@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    values = image_recipe(root, assets.timm_teacher, assets.imgs, max_steps=1, eval_split=None)
    assert main(["train", str(write_recipe(root / "r.yaml", **values))]) == 0
    return root / "out"


@pytest.mark.parametrize("form", ["training", "packed"])
def test_eval_config_contradicting_weights_is_one_line(form, assets, trained, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(trained if form == "training" else trained / "packed", model,
                    ignore=shutil.ignore_patterns("checkpoint-*", "packed"))
    config = json.loads((model / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["weight_granularity"] == "per_channel"
    quant["weight_granularity"] = "per_tensor"  # the weights hold one step per channel
    (model / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--model_path", str(model), "--dataset_name", str(assets.imgs),
                 "--eval_split", "test"]) == 2
    line = _error_line(capsys.readouterr().err, "eval")
    assert f"model_path {model}: " in line and "config.json" in line and "weight_granularity" in line
    assert "Fix" in line or "restore" in line


def test_eval_size_mismatch_from_the_loader_is_one_line(assets, trained, tmp_path, capsys, monkeypatch):
    """A loader's size-mismatch RuntimeError (e.g. a file saved before the quantization was recorded in it)."""
    def mismatch(path, *args, **kwargs):
        raise RuntimeError("Error(s) in loading state_dict for ResNet:\n\tsize mismatch for conv1.0.weight_quantizer."
                           "step: copying a param with shape torch.Size([8, 1, 1, 1]) from checkpoint, the shape in "
                           "current model is torch.Size([]).")

    monkeypatch.setattr("sqakd_hf.checkpoint.load_quantized", mismatch)
    assert main(["eval", "--model_path", str(trained), "--dataset_name", str(assets.imgs),
                 "--eval_split", "test"]) == 2
    line = _error_line(capsys.readouterr().err, "eval")
    assert f"the weights do not match {trained / 'config.json'}" in line and "size mismatch for conv1.0" in line
    assert "restore the config.json saved with these weights" in line


def test_eval_model_folder_without_config(assets, trained, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(trained / "packed", model)
    (model / "config.json").unlink()
    assert main(["eval", "--model_path", str(model), "--dataset_name", str(assets.imgs)]) == 2
    line = _error_line(capsys.readouterr().err, "eval")
    assert "no config.json" in line and "output_dir" in line
