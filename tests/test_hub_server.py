"""The real ``huggingface_hub`` client works end to end against the in-process LocalHub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import load_file, save_file

from hub_fixtures import local_hub  # noqa: F401  (pytest fixture)
from hub_server import LocalHub

REPO = "testuser/tiny-model"
OID = re.compile(r"^[0-9a-f]{40}$")


def _make_folder(path: Path, hidden: int = 4) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": hidden}))
    torch.manual_seed(hidden)
    save_file({"w": torch.randn(hidden, hidden), "b": torch.zeros(hidden)}, str(path / "model.safetensors"))
    (path / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- sqakd\n---\n# Tiny model\n")
    return path


def test_fixture_points_client_at_local_hub(local_hub: LocalHub) -> None:
    assert constants.ENDPOINT == local_hub.url
    assert constants.HF_HUB_OFFLINE is False and not huggingface_hub.is_offline_mode()
    assert huggingface_hub.hf_api.api.endpoint == local_hub.url
    assert HfApi().whoami()["name"] == "testuser"


def test_create_repo_exist_ok(local_hub: LocalHub) -> None:
    url = huggingface_hub.create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(local_hub.url)
    again = HfApi().create_repo(REPO, exist_ok=True)
    assert again.repo_id == REPO
    with pytest.raises(HfHubHTTPError) as exc_info:
        HfApi().create_repo(REPO)
    assert exc_info.value.response.status_code == 409
    assert HfApi().create_repo("no-namespace").repo_id == "testuser/no-namespace"
    assert set(local_hub.repos) == {REPO, "testuser/no-namespace"}


def test_upload_folder_twice_then_download(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    folder = _make_folder(tmp_path / "v1")
    first = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="v1")
    assert OID.match(first.oid) and first.commit_url.endswith(first.oid)
    for name in ("config.json", "model.safetensors", "README.md"):
        assert local_hub.repos[REPO][name] == (folder / name).read_bytes()

    info = api.model_info(REPO)
    assert info.sha == first.oid
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "config.json", "model.safetensors", "README.md"}

    # Second commit: config and weights change, a new file appears, README is unchanged.
    folder2 = _make_folder(tmp_path / "v2", hidden=6)
    (folder2 / "extra" / "notes.txt").parent.mkdir()
    (folder2 / "extra" / "notes.txt").write_text("second commit")
    second = api.upload_folder(repo_id=REPO, folder_path=folder2, commit_message="v2")
    assert OID.match(second.oid) and second.oid != first.oid
    assert [c.message for c in local_hub.history[REPO]] == ["initial commit", "v1", "v2"]
    assert api.repo_info(REPO).sha == second.oid

    cache = tmp_path / "cache"
    config_path = huggingface_hub.hf_hub_download(REPO, "config.json", cache_dir=cache)
    assert Path(config_path).read_bytes() == (folder2 / "config.json").read_bytes()
    old_config = huggingface_hub.hf_hub_download(REPO, "config.json", revision=first.oid, cache_dir=cache)
    assert Path(old_config).read_bytes() == (folder / "config.json").read_bytes()

    snapshot = Path(huggingface_hub.snapshot_download(REPO, cache_dir=tmp_path / "cache2"))
    assert snapshot.name == second.oid
    for name in ("config.json", "model.safetensors", "README.md", "extra/notes.txt"):
        assert (snapshot / name).read_bytes() == (folder2 / name).read_bytes()
    weights = load_file(snapshot / "model.safetensors")
    torch.testing.assert_close(weights["w"], load_file(folder2 / "model.safetensors")["w"])
    assert not any("lfs" in r or "xet" in r for r in local_hub.requests), local_hub.requests


def test_upload_file_and_delete(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"hello", path_in_repo="sub/a.txt", repo_id=REPO)
    assert {f.path for f in api.list_repo_tree(REPO)} == {".gitattributes", "sub"}
    assert {f.path for f in api.list_repo_tree(REPO, recursive=True)} == {".gitattributes", "sub", "sub/a.txt"}
    assert api.file_exists(REPO, "sub/a.txt") and not api.file_exists(REPO, "sub/b.txt")
    api.delete_file("sub/a.txt", repo_id=REPO)
    assert "sub/a.txt" not in local_hub.repos[REPO]


def test_seeded_repo_download(local_hub: LocalHub, tmp_path: Path) -> None:
    commit = local_hub.commit_files(REPO, {"config.json": b"{}", "weights/a.bin": b"\x00\x01"})
    path = huggingface_hub.hf_hub_download(REPO, "weights/a.bin", cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"\x00\x01" and Path(path).parent.parent.name == commit.oid


def test_missing_repo_and_file(local_hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("testuser/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.hf_hub_download("testuser/does-not-exist", "config.json", cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        huggingface_hub.snapshot_download("testuser/does-not-exist", cache_dir=tmp_path)
    HfApi().create_repo(REPO)
    with pytest.raises(EntryNotFoundError):
        huggingface_hub.hf_hub_download(REPO, "missing.json", cache_dir=tmp_path)


def test_fail_commits(local_hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    local_hub.fail_commits = True
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.upload_folder(repo_id=REPO, folder_path=_make_folder(tmp_path / "m"))
    assert exc_info.value.response.status_code == 500
    assert set(local_hub.repos[REPO]) == {".gitattributes"}
    local_hub.fail_commits = False
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "m")
    assert "model.safetensors" in local_hub.repos[REPO]


def test_upload_folder_with_xet_enabled(local_hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With hf_xet installed, upload_folder takes the pipelined path; "regular" files never touch Xet."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    api = HfApi()
    api.create_repo(REPO)
    folder = _make_folder(tmp_path / "m")
    info = api.upload_folder(repo_id=REPO, folder_path=folder)
    assert api.model_info(REPO).sha == info.oid
    assert local_hub.repos[REPO]["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert not any("xet" in r for r in local_hub.requests), local_hub.requests


def test_subprocess_uses_env(local_hub: LocalHub, tmp_path: Path) -> None:
    """A fresh interpreter picks the LocalHub up from the environment variables set by the fixture."""
    HfApi().create_repo(REPO)
    code = (
        "import huggingface_hub as h, pathlib;"
        "h.upload_file(path_or_fileobj=b'from child', path_in_repo='child.txt', repo_id='%s');"
        "print(pathlib.Path(h.hf_hub_download('%s', 'child.txt')).read_text())" % (REPO, REPO)
    )
    cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "from child"
    assert local_hub.repos[REPO]["child.txt"] == b"from child"
