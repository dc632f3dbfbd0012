"""The ``sqakd-hf`` command: ``train`` end to end (train, save, reload, ``eval``) on a local digits
imagefolder with a timm teacher and on a csv text dataset with a tiny BERT teacher; a real 2-process
``accelerate launch`` (DDP over gloo on CPU); output-folder rules; every bad input rejected before
any work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cli_fixtures import (
    free_port,
    image_recipe,
    save_bert_teacher,
    save_timm_teacher,
    write_digits_imagefolder,
    write_recipe,
    write_text_csv,
)
from hub_fixtures import local_hub  # noqa: F401  (pytest fixture: a Hub-protocol server on 127.0.0.1)
from sqakd_hf import from_pretrained_timm, is_quantized
from sqakd_hf.app.cli import METRICS_FILE, RUN_RECORD, main
from sqakd_hf.checkpoint import load_quantized

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = root / "text"
    write_text_csv(text / "train.csv", 48)
    write_text_csv(text / "test.csv", 16, seed=1)
    return SimpleNamespace(
        imgs=write_digits_imagefolder(root / "digits", n_train=64, n_test=24),
        timm_teacher=save_timm_teacher(root / "timm-teacher"),
        bert_teacher=save_bert_teacher(root / "bert-teacher"),
        text=text,
    )


def _batch(assets, n: int = 8) -> torch.Tensor:
    from sqakd_hf.app.data import load_digits_splits

    return load_digits_splits(image_size=32)["test"][:n]["pixel_values"]


# ---- end to end ----------------------------------------------------------------------------------------
def test_train_timm_imagefolder_save_reload_eval(assets, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", **image_recipe(tmp_path, assets.timm_teacher, assets.imgs))
    assert main(["train", str(recipe), "--learning_rate", "5e-4"]) == 0
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", RUN_RECORD, METRICS_FILE, "packed"} <= set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(out / "packed"))
    record = json.loads((out / RUN_RECORD).read_text())
    assert record["teacher"] == str(assets.timm_teacher) and record["recipe"]["learning_rate"] == 5e-4
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert set(metrics["student"]) == {"kd_loss", "teacher_agreement", "accuracy"}
    assert "accuracy" in metrics["teacher"]
    printed = capsys.readouterr().out
    assert "SQAKD lsq-W4A4 student" in printed and "student accuracy" in printed

    # reload: training form (timm-native loader) and packed form give the same function
    trained = from_pretrained_timm(out)
    packed = load_quantized(out / "packed")
    assert is_quantized(trained) and is_quantized(packed)
    x = _batch(assets)
    with torch.no_grad():
        a, b = trained(x), packed(x)
    assert torch.allclose(a, b, atol=1e-2 * float(a.abs().max()) + 1e-4)
    card = (out / "packed" / "README.md").read_text()
    assert "lsq" in card and "W4A4" in card.replace(" ", "")

    # eval of the saved model: the teacher is found from the run record; numbers match the training run
    result = tmp_path / "eval.json"
    assert main(["eval", "--model_path", str(out), "--dataset_name", str(assets.imgs), "--eval_split", "test",
                 "--output_file", str(result)]) == 0
    evaluated = json.loads(result.read_text())
    assert evaluated["student"]["accuracy"] == pytest.approx(metrics["student"]["accuracy"])
    assert evaluated["student"]["teacher_agreement"] == pytest.approx(metrics["student"]["teacher_agreement"])
    assert evaluated["teacher"]["accuracy"] == pytest.approx(metrics["teacher"]["accuracy"])
    # eval from the recipe, of the packed form
    assert main(["eval", str(recipe), "--model_path", str(out / "packed")]) == 0
    assert "teacher agreement" in capsys.readouterr().out


def test_train_bert_on_csv_text_then_reload_with_transformers(assets, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = write_recipe(
        tmp_path / "text.yaml", teacher=str(assets.bert_teacher), dataset_name=str(assets.text),
        train_split="train", eval_split="test", max_length=16, output_dir=str(tmp_path / "bert-out"),
        max_steps=2, per_device_train_batch_size=8, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    assert main(["train", str(recipe), "--weight_bits", "8", "--act_bits", "8", "--method", "pact"]) == 0
    out = tmp_path / "bert-out"
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert {"kd_loss", "teacher_agreement", "accuracy"} <= set(metrics["student"])
    model = AutoModelForSequenceClassification.from_pretrained(out)
    packed = AutoModelForSequenceClassification.from_pretrained(out / "packed")
    assert is_quantized(model) and is_quantized(packed)
    assert model.config.quantization_config.method == "pact" and packed.config.quantization_config.packed
    tok = AutoTokenizer.from_pretrained(out / "packed")
    enc = tok(["the movie was great", "awful plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = model(**enc).logits, packed(**enc).logits
    assert torch.allclose(a, b, atol=1e-2 * float(a.abs().max()) + 1e-4)
    assert main(["eval", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "Evaluation on" in printed and "teacher" in printed


def test_train_streaming_data(assets, tmp_path):
    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs, streaming=True, max_steps=2, save_packed=False)
    assert main(["train", str(write_recipe(tmp_path / "s.yaml", **values))]) == 0
    metrics = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert "teacher_agreement" in metrics["student"]
    assert is_quantized(from_pretrained_timm(tmp_path / "out"))


def test_evaluation_metrics_are_exact_on_known_cases(assets):
    """A model against itself agrees 100% with KD loss 0; accuracy counts labels."""
    import timm

    from sqakd_hf.app.data import image_collator, load_digits_splits
    from sqakd_hf.training.metrics import evaluate_models

    model = timm.create_model(f"local-dir:{assets.timm_teacher}", pretrained=True).eval()
    test = load_digits_splits(image_size=32)["test"].select(range(40))
    m = evaluate_models(model, model, test, image_collator, batch_size=16, progress=False)
    assert m["student"]["teacher_agreement"] == 1.0 and m["student"]["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        pred = model(test[:]["pixel_values"]).argmax(1)
    assert m["teacher"]["accuracy"] == pytest.approx(float((pred == test[:]["labels"]).float().mean()))


def test_train_then_push_to_hub(assets, tmp_path, local_hub):
    """push_to_hub / hub_model_id: the packed model and its model card go to the (local) Hub."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs, max_steps=1, push_to_hub=True,
                          hub_model_id="testuser/digits-lsq-w4a4")
    assert main(["train", str(write_recipe(tmp_path / "push.yaml", **values))]) == 0
    files = set(HfApi().list_repo_files("testuser/digits-lsq-w4a4"))
    assert {"config.json", "model.safetensors", "README.md"} <= files
    card = Path(hf_hub_download("testuser/digits-lsq-w4a4", "README.md")).read_text()
    assert "W4A4" in card.replace(" ", "") and "accuracy" in card.lower()
    assert "\n# testuser/digits-lsq-w4a4\n" in card  # titled by the Hub repo, not by a local folder
    assert 'from_pretrained_timm("testuser/digits-lsq-w4a4")' in card
    downloaded = load_quantized(snapshot_download("testuser/digits-lsq-w4a4"))
    assert is_quantized(downloaded)


def test_accelerate_launch_two_processes(assets, tmp_path):
    """A real 2-process DDP run (gloo on CPU) of the unchanged command, with the shipped accelerate config; with
    ``layer_bits_budget`` both ranks measure their share (error sums all-reduced), rank 0 reports the choice once."""
    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs, max_steps=2, per_device_train_batch_size=8,
                          layer_bits_budget=0.2)
    recipe = write_recipe(tmp_path / "ddp.yaml", **values)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
           "-m", "sqakd_hf", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "sqakd-hf: process 0/2" in output and "sqakd-hf: process 1/2" in output  # both ranks ran
    assert output.count("SQAKD lsq-W4A4 student") == 1  # the summary is printed by rank 0 only
    assert output.count("measuring each layer's sensitivity") == 1 and output.count("most sensitive layer(s)") == 1
    # every parameter of the student gets a gradient: DDP runs without the unused-parameter search (and its warning)
    assert "find_unused_parameters=True was specified" not in output and "get no gradient" not in output
    out = tmp_path / "out"
    state = json.loads((out / METRICS_FILE).read_text())
    assert "teacher_agreement" in state["student"]
    model = from_pretrained_timm(out)
    packed = load_quantized(out / "packed")
    chosen = json.loads((out / RUN_RECORD).read_text())["chosen_layer_bits"]["layers"]
    assert chosen and {n for n, b in _weight_bits(model).items() if b == 8} == set(chosen)
    x = _batch(assets)
    with torch.no_grad():
        a, b = model(x), packed(x)
    assert torch.allclose(a, b, atol=1e-2 * float(a.abs().max()) + 1e-4)


def test_output_dir_rules_resume_and_overwrite(assets, tmp_path, capsys):
    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs, max_steps=2, save_strategy="steps",
                          save_steps=2, eval_split=None, save_packed=False)
    recipe = write_recipe(tmp_path / "r.yaml", **values)
    out = tmp_path / "out"
    assert main(["train", str(recipe)]) == 0
    assert (out / "checkpoint-2").is_dir()
    capsys.readouterr()

    # the same run again: refused, with the two ways forward
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "already holds this run" in err and "--resume_from_checkpoint true" in err
    assert "--overwrite_output_dir true" in err
    # a different run into the same folder: refused, naming what differs
    assert main(["train", str(recipe), "--weight_bits", "2"]) == 2
    assert "holds a different run (weight_bits: 4 -> 2)" in capsys.readouterr().err
    # resuming with different quantization settings: refused
    assert main(["train", str(recipe), "--weight_bits", "2", "--resume_from_checkpoint", "true"]) == 2
    assert "holds a different run" in capsys.readouterr().err
    # resuming the same run for more steps
    assert main(["train", str(recipe), "--resume_from_checkpoint", "true", "--max_steps", "3"]) == 0
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    # overwrite_output_dir: a different run replaces it (its checkpoints go, so no resume can mix them)
    assert main(["train", str(recipe), "--weight_bits", "2", "--overwrite_output_dir", "true"]) == 0
    assert json.loads((out / RUN_RECORD).read_text())["recipe"]["weight_bits"] == 2
    assert not (out / "checkpoint-3").exists() and (out / "checkpoint-2").is_dir()
    # a folder with foreign files
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["train", str(recipe), "--output_dir", str(foreign)]) == 2
    assert "is not empty (notes.txt) and holds no sqakd-hf run" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]


def _weight_bits(model) -> dict:
    from sqakd_hf.injection import quant_layers

    return {name: layer.weight_quantizer.bits for name, layer in quant_layers(model)}


def test_layer_bits_budget_chooses_by_measured_sensitivity_and_resume_reuses_it(assets, tmp_path, monkeypatch,
                                                                                capsys):
    """``--layer_bits_budget``: the layers the measurement ranks most sensitive get 8-bit weights within the budget;
    the choice is printed, recorded, saved with the model (training and packed forms) and reused on resume."""
    import sqakd_hf.app.layer_choice as layer_choice
    from sqakd_hf import choose_layer_bits

    seen, measure = {}, layer_choice.layer_sensitivity

    def spy(model, config, batches, **kwargs):  # the real measurement, its inputs and result kept
        seen.update(teacher=model, config=config, batches=list(batches))
        seen["sensitivity"] = measure(model, config, seen["batches"], **kwargs)
        return seen["sensitivity"]

    monkeypatch.setattr(layer_choice, "layer_sensitivity", spy)
    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs, max_steps=2, save_strategy="steps",
                          save_steps=2, calibration_batches=2, layer_bits_budget=0.3)
    recipe = write_recipe(tmp_path / "mixed.yaml", **values)
    assert main(["train", str(recipe)]) == 0
    out = tmp_path / "out"
    choice = json.loads((out / RUN_RECORD).read_text())["chosen_layer_bits"]

    # measured on the calibration batches of training inputs (2 x 16 images), with the run's W4A4 config
    assert [tuple(b.shape) for b in seen["batches"]] == [(16, 3, 32, 32)] * 2
    assert seen["config"].weight_bits == 4 and seen["config"].layer_bits == {}
    # the greedy choice of the measured ranking; at most 30% of the weights, and the top layer is in it
    sensitivity = seen["sensitivity"]
    assert choice["layer_bits"] == choose_layer_bits(seen["teacher"], sensitivity, 0.3)
    assert max(sensitivity, key=sensitivity.get) in choice["layers"]
    assert 0 < choice["share"] <= 0.3 and 0 < len(choice["layers"]) < len(sensitivity)
    printed = capsys.readouterr().out
    assert f"8-bit weights for the {len(choice['layers'])} most sensitive layer(s)" in printed
    assert ", ".join(choice["layers"]) in printed

    # the saved student (training and packed form) has exactly those 8-bit layers, all others at 4 bits
    expected = {name: 8 if name in choice["layers"] else 4 for name in sensitivity}
    assert _weight_bits(from_pretrained_timm(out)) == expected
    assert _weight_bits(load_quantized(out / "packed")) == expected

    # resume: the recorded choice is reused (no second measurement), and kept in the record
    monkeypatch.setattr(layer_choice, "layer_sensitivity", lambda *a, **k: pytest.fail("measured again on resume"))
    assert main(["train", str(recipe), "--resume_from_checkpoint", "true", "--max_steps", "3"]) == 0
    assert json.loads((out / RUN_RECORD).read_text())["chosen_layer_bits"] == choice
    assert _weight_bits(from_pretrained_timm(out)) == expected


def test_ptq_of_a_transformers_teacher_with_layer_bits_budget(assets, tmp_path, capsys):
    """``sqakd-hf ptq --layer_bits_budget`` on a BERT classifier: the chosen linears are 8-bit in the reloaded
    training and packed forms (their config carries the pattern), every other quantized linear 4-bit."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "bert-ptq"
    recipe = write_recipe(
        tmp_path / "ptq.yaml", teacher=str(assets.bert_teacher), dataset_name=str(assets.text), train_split="train",
        max_length=16, output_dir=str(out), per_device_train_batch_size=8, calibration_batches=2, report_to="none",
        disable_tqdm=True, weight_bits=4, act_bits=8, layer_bits_budget=0.25)
    assert main(["ptq", str(recipe)]) == 0
    choice = json.loads((out / RUN_RECORD).read_text())["chosen_layer_bits"]
    assert choice["layers"] and 0 < choice["share"] <= 0.25
    assert "most sensitive layer(s)" in capsys.readouterr().out
    for folder in (out, out / "packed"):
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        bits = _weight_bits(model)
        assert {n for n, b in bits.items() if b == 8} == set(choice["layers"]), folder
        assert set(bits.values()) == {4, 8}
        assert model.config.quantization_config.layer_bits == choice["layer_bits"]


# ---- bad input: a clear error before any work ---------------------------------------------------------------
BAD_INPUTS = {
    "unknown recipe key": ({"learning_rat": 0.1},
                           ["unknown key 'learning_rat' (did you mean 'learning_rate'?)", "Valid keys:",
                            "quantization (QuantArguments): method, weight_bits"]),
    "missing teacher folder": ({"teacher": "{tmp}/no-teacher"}, ["no such folder"]),
    "missing dataset": ({"dataset_name": "{tmp}/no-data"}, ["dataset_name", "no such file or directory"]),
    "missing column": ({"image_column": "photo"},
                       ["image_column 'photo' does not exist", "available columns: image (image), label (label)"]),
    "missing label column": ({"label_column": "target"}, ["label_column 'target' does not exist"]),
    "text data for an image model": ({"dataset_name": "{text}"},
                                     ["has no image column: it looks like a text dataset (text columns: text)",
                                      "Available columns: text (text), label (other)"]),
    "image data for a text model": ({"teacher": "{bert}"},
                                    ["has no text column: it looks like an image dataset (image columns: image)"]),
    "unknown split": ({"eval_split": "validation"}, ["cannot load split 'validation'"]),
    "task mismatch": ({"task": "text-classification"}, ["task 'text-classification' does not match the teacher"]),
    "bad bits": ({"weight_bits": 16}, ["weight_bits must be an integer in 1..8"]),
    "bad method": ({"method": "foo"}, ["method must be one of"]),
    "streaming without max_steps": ({"streaming": True, "max_steps": -1}, ["streaming: true needs max_steps > 0"]),
    "resume without checkpoint": ({"resume_from_checkpoint": "true"}, ["holds no checkpoint-* folder"]),
    "ce_weight without labels": ({"ce_weight": 0.5, "use_labels": False}, ["ce_weight > 0 needs labels"]),
    "layer_bits_budget outside (0, 1)": ({"layer_bits_budget": 1.5},
                                         ["layer_bits_budget is a share of the quantized weight elements, in (0, 1)"]),
    "sensitive_layer_bits out of range": ({"layer_bits_budget": 0.1, "sensitive_layer_bits": 12},
                                          ["sensitive_layer_bits must be an integer in 1..8; got 12"]),
    "eval strategy without eval split": ({"eval_split": None, "eval_strategy": "steps"},
                                         ["eval_strategy 'steps' needs an eval_split"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_before_any_work(case, assets, tmp_path, capsys):
    change, expected = BAD_INPUTS[case]
    subst = {"tmp": str(tmp_path), "text": str(assets.text), "bert": str(assets.bert_teacher)}
    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs)
    values.update({k: (v.format(**subst) if isinstance(v, str) else v) for k, v in change.items()})
    values = {k: v for k, v in values.items() if v is not None}
    recipe = write_recipe(tmp_path / "bad.yaml", **values)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "sqakd-hf train: error: " in err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "out" / RUN_RECORD).exists()  # nothing started
    assert "Traceback" not in err


def test_missing_recipe_and_bad_overrides(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file" in capsys.readouterr().err
    recipe = write_recipe(tmp_path / "r.yaml", teacher="x", dataset_name="y", output_dir=str(tmp_path / "o"))
    assert main(["train", str(recipe), "--weight_bits", "abc"]) == 2
    assert "weight_bits: cannot read 'abc' as int" in capsys.readouterr().err
    assert main(["train", str(recipe), "--num_epochs", "3"]) == 2
    assert "unknown key 'num_epochs' (did you mean 'num_train_epochs'?)" in capsys.readouterr().err
    assert main(["train", str(recipe), "stray"]) == 2
    assert "overrides are written --key value" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["eval", "--dataset_name", str(tmp_path)]) == 2
    assert "no model to evaluate" in capsys.readouterr().err


def test_text_run_never_imports_timm_and_respects_eval_teacher(assets, tmp_path):
    """A text-only ``train`` (in a fresh process) loads no timm; ``eval_teacher: false`` drops the teacher's metrics."""
    recipe = write_recipe(
        tmp_path / "text.yaml", teacher=str(assets.bert_teacher), dataset_name=str(assets.text), eval_split="test",
        max_length=16, output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8,
        save_strategy="no", report_to="none", disable_tqdm=True, save_packed=False, eval_teacher=False,
    )
    code = ("import sys\nfrom sqakd_hf.app.cli import main\n"
            f"assert main(['train', {str(recipe)!r}]) == 0\n"
            "assert 'timm' not in sys.modules, 'a text-only run imported timm'\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert "teacher" not in metrics and "teacher_agreement" in metrics["student"]


def test_cli_module_is_light_and_version_is_fast():
    """``sqakd-hf --version`` / ``--help`` import no torch, transformers, datasets or timm."""
    import sqakd_hf

    heavy = ("torch", "transformers", "datasets", "timm")
    code = f"import sqakd_hf.app.cli, sys; assert not [m for m in {heavy!r} if m in sys.modules]"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    script = Path(sys.executable).parent / "sqakd-hf"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "sqakd_hf"]
    for flag in ("--version", "--help"):
        code = (f"import runpy, sys; sys.argv = {['sqakd-hf', flag]!r}\n"
                "try:\n    runpy.run_module('sqakd_hf', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                f"assert not [m for m in {heavy!r} if m in sys.modules]")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == f"sqakd-hf {sqakd_hf.__version__}"


def test_help(capsys):
    """(``python -m sqakd_hf`` itself runs in the accelerate test.)"""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sqakd-hf <command>" in out and "quickstart" in out and "accelerate launch" in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--teacher (str, default None)" in out and "--weight_bits (int, default 4)" in out
    assert "--temperature (float, default 4.0)" in out
    assert main(["eval", "--help"]) == 0
    assert "--model_path" in capsys.readouterr().out
    assert main([]) == 2


# ---- the new user's path: their own latin-1 csv files, separate train / eval data, PTQ, eval elsewhere ----------
@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
    from cli_fixtures import save_minilm_classifier, write_tweets_csv

    root = tmp_path_factory.mktemp("tweets")
    return SimpleNamespace(root=root, teacher=save_minilm_classifier(root / "minilm-tweets"),
                           train=write_tweets_csv(root / "data" / "train.csv", 48, with_labels=False),
                           eval=write_tweets_csv(root / "data" / "eval.csv", 15, seed=1))


def _tweet_recipe(tweets, out: str, **extra):
    values = dict(teacher="minilm-tweets", train_files="data/train.csv", eval_files="data/eval.csv",
                  text_column="tweet", dataset_kwargs={"encoding": "latin-1"}, max_length=8, method="lsq",
                  weight_bits=8, act_bits=8, output_dir=out, max_steps=2, per_device_train_batch_size=8,
                  per_device_eval_batch_size=16, calibration_batches=1, save_strategy="no", report_to="none",
                  disable_tqdm=True)
    values.update(extra)
    return write_recipe(tweets.root / f"{Path(out).name}.yaml", **values)


def test_new_user_path_minilm_tweets_train_ptq_and_eval_elsewhere(tweets, tmp_path, monkeypatch, capsys):
    """Real MiniLM weights, unlabeled latin-1 training tweets and labeled eval tweets in separate files, relative
    paths: train and ptq run from the recipe alone; the card matches the run record field by field; ``eval`` run
    from another folder finds the teacher, the data and the run's max_length in the record."""
    from cli_fixtures import check_card_against_record

    monkeypatch.chdir(tweets.root)
    assert main(["train", str(_tweet_recipe(tweets, "run-sqakd"))]) == 0
    assert main(["ptq", str(_tweet_recipe(tweets, "run-ptq"))]) == 0
    printed = capsys.readouterr().out
    assert "SQAKD lsq-W8A8 student of minilm-tweets" in printed and "PTQ lsq-W8A8 model of minilm-tweets" in printed
    trained, ptq = (check_card_against_record(tweets.root / name) for name in ("run-sqakd", "run-ptq"))
    assert trained["teacher"] == str(tweets.teacher.resolve()) and not trained["teacher_on_hub"]
    assert trained["result"]["mode"] == "train" and trained["result"]["optimizer_steps"] == 2
    assert trained["result"]["epochs"] == pytest.approx(2 * 8 / 48, abs=1e-3)  # max_steps ended it at 1/3 epoch
    assert trained["result"]["eval"]["split"] == "eval.csv" and trained["result"]["eval"]["examples"] == 15
    assert ptq["result"]["mode"] == "ptq" and ptq["result"]["optimizer_steps"] == 0
    assert {"config.json", "model.safetensors", RUN_RECORD, METRICS_FILE, "packed"} <= set(
        os.listdir(tweets.root / "run-ptq"))
    assert is_quantized(load_quantized(tweets.root / "run-ptq" / "packed"))

    # eval from elsewhere, with nothing but the model path: the record gives teacher, files, encoding, max_length
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in ("run-sqakd", "run-ptq"):
        result = elsewhere / f"{name}.json"
        assert main(["eval", "--model_path", str(tweets.root / name / "packed"), "--output_file", str(result)]) == 0
        evaluated = json.loads(result.read_text())
        recorded = json.loads((tweets.root / name / METRICS_FILE).read_text())
        for who in ("student", "teacher"):
            for metric, value in recorded[who].items():
                assert evaluated[who][metric] == pytest.approx(value, abs=2e-3), (name, who, metric)
    assert f"Evaluation on eval_files {tweets.eval}" in capsys.readouterr().out
    # an explicit max_length overrides the record's (and changes what the model sees: the tweets are longer)
    result = elsewhere / "long.json"
    assert main(["eval", "--model_path", str(tweets.root / "run-sqakd"), "--max_length", "64",
                 "--output_file", str(result)]) == 0
    assert json.loads(result.read_text())["student"]["kd_loss"] != pytest.approx(
        json.loads((tweets.root / "run-sqakd" / METRICS_FILE).read_text())["student"]["kd_loss"], rel=1e-6)


#: the bad inputs of a user's own text data: one line naming the file and the fix, exit status 2
TEXT_BAD_INPUTS = {
    "latin-1 csv read as utf-8": ({"dataset_kwargs": None},
                                  ["train.csv is not utf-8 text (byte 0x", "set dataset_kwargs: {encoding: latin-1}"]),
    "latin-1 eval csv read as utf-8": ({"eval_dataset_kwargs": {"encoding": "utf-8"}},
                                       ["eval.csv is not utf-8 text", "set eval_dataset_kwargs: {encoding: latin-1}"]),
    "files with different columns": ({"train_files": ["data/train.csv", "data/eval.csv"], "eval_files": None},
                                     ["eval.csv: its columns differ from the other files of train_files",
                                      "new columns ({'label'})", "put evaluation data with other columns in eval_files"]),
    "missing train file": ({"train_files": "data/nope.csv"}, ["train_files entry 'data/nope.csv': no such file"]),
    "missing eval file": ({"eval_files": "data/nope.csv"}, ["eval_files entry 'data/nope.csv': no such file"]),
    "missing text column": ({"text_column": "text"}, ["text_column 'text' does not exist in train_files data/train.csv",
                                                      "available columns: tweet (text)"]),
    "missing eval label column": ({"eval_label_column": "sentiment"},
                                  ["eval_label_column 'sentiment' does not exist in eval_files data/eval.csv",
                                   "tweet (text), label (other)"]),
    "unknown reader option": ({"dataset_kwargs": {"encoding": "latin-1", "delimter": ";"}},
                              ["dataset_kwargs: the csv reader of train_files data/train.csv has no option 'delimter'"]),
    "reader options not a mapping": ({"dataset_kwargs": "latin-1"},
                                     ["dataset_kwargs must be a mapping of reader options like {encoding: latin-1}"]),
    "both dataset_name and train_files": ({"dataset_name": "data"},
                                          ["set either dataset_name or train_files for the training data, not both"]),
    "eval_files with eval_split": ({"eval_split": "test"}, ["eval_files are read whole: drop eval_split"]),
    "eval dataset without split": ({"eval_files": None, "eval_dataset_name": "data"},
                                   ["eval_dataset_name 'data' needs an eval_split"]),
    "ptq resume": ({"resume_from_checkpoint": "true", "_command": "ptq"}, ["ptq does not train"]),
}


@pytest.mark.parametrize("case", sorted(TEXT_BAD_INPUTS))
def test_bad_text_data_is_one_line(case, tweets, monkeypatch, capsys):
    change, expected = TEXT_BAD_INPUTS[case]
    change = dict(change)
    command = change.pop("_command", "train")
    monkeypatch.chdir(tweets.root)
    recipe = _tweet_recipe(tweets, "bad-run", **change)
    text = recipe.read_text()
    recipe.write_text("\n".join(line for line in text.splitlines() if not line.endswith(": null")) + "\n")
    monkeypatch.setattr("sqakd_hf.app.train.load_fp_teacher",
                        lambda *a, **k: pytest.fail("a model was loaded before the data was checked"))
    assert main([command, str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"sqakd-hf {command}: error: ")]
    assert len(lines) == 1, err
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (tweets.root / "bad-run").exists()


def test_ptq_help_and_missing_recipe(capsys):
    assert main(["ptq", "--help"]) == 0
    assert "usage: sqakd-hf ptq RECIPE.yaml" in capsys.readouterr().out
    assert main(["ptq"]) == 2
    assert main(["--help"]) == 0
    assert "ptq" in capsys.readouterr().out
