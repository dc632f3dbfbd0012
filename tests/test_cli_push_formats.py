"""``sqakd-hf train`` with ``push_to_hub`` and a deploy ``hub_format``: what lands on the (local) Hub runs without
sqakd_hf; a format the teacher cannot take is refused before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")

from cli_fixtures import image_recipe, write_recipe  # noqa: E402
from hub_fixtures import local_hub  # noqa: F401, E402  (pytest fixture)
from sqakd_hf import from_pretrained_timm  # noqa: E402
from sqakd_hf.app.cli import main  # noqa: E402
from test_cli import _batch, assets  # noqa: F401, E402  (module fixture: a timm teacher and a digits imagefolder)



def test_train_then_push_to_hub_as_onnx(assets, tmp_path, local_hub, capsys):
    """hub_format: onnx uploads the QDQ graph (+ timm config) with the run's card, which runs in onnxruntime;
    hub_format: compressed-tensors for a timm teacher is refused before training."""
    import numpy as np
    import onnxruntime as ort
    from huggingface_hub import HfApi, hf_hub_download

    values = image_recipe(tmp_path, assets.timm_teacher, assets.imgs, max_steps=1, push_to_hub=True,
                          hub_model_id="testuser/digits-onnx", hub_format="onnx", act_granularity="per_tensor",
                          save_packed=False)
    assert main(["train", str(write_recipe(tmp_path / "push.yaml", **values))]) == 0
    assert {"model.onnx", "config.json", "README.md"} <= set(HfApi().list_repo_files("testuser/digits-onnx"))
    card = Path(hf_hub_download("testuser/digits-onnx", "README.md")).read_text()
    snippet = card.split("## How to load")[1].split("```python\n")[1].split("```")[0]
    assert "ort.InferenceSession" in snippet and "sqakd_hf" not in snippet and "accuracy" in card
    session = ort.InferenceSession(hf_hub_download("testuser/digits-onnx", "model.onnx"))
    x = _batch(assets)
    student = from_pretrained_timm(tmp_path / "out").eval()
    with torch.no_grad():
        ref = student(x).numpy()
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) <= 1e-4

    bad = write_recipe(tmp_path / "ct.yaml", **{**values, "hub_format": "compressed-tensors",
                                                 "output_dir": str(tmp_path / "ct")})
    assert main(["train", str(bad)]) == 2
    assert "hub_format: compressed-tensors is for transformers models" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists() and "testuser/ct" not in local_hub.repos
