"""In-process fake of the Hugging Face Hub HTTP API, for tests.

Speaks just enough of the protocol used by ``huggingface_hub`` (checked against 2.4) for the real
client to create model repos, commit files and download them back:

* ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``,
  ``POST /api/validate-yaml``
* ``GET /api/models/{repo}[/revision/{rev}]`` (repo info with ``sha`` and ``siblings``)
* ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (used by ``snapshot_download``)
* ``POST /api/models/{repo}/preupload/{rev}``: every file is answered ``"regular"``, so the client
  never goes through LFS or Xet (it only does so for files the server flags as ``"lfs"``)
* ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header / file / deletedFile / deletedFolder)
* ``HEAD|GET /{repo}/resolve/{rev}/{path}`` (with ``X-Repo-Commit`` and ``ETag``; ``Range`` honoured)

Only the ``main`` branch exists; any past commit oid is a valid read revision. No ``X-Xet-*``
header is ever sent. Unknown endpoints answer 501 so that a missing feature is obvious.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_USER = "testuser"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """Git blob sha1 of ``data``: what the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    """One commit on ``main``: a full snapshot of the repo's files."""

    oid: str
    message: str
    files: dict[str, bytes]
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))


class HubError(Exception):
    """Raised by route handlers; becomes a JSON error response with Hub-style error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class LocalHub:
    """A fake Hub on ``127.0.0.1`` (ephemeral port), served from a background thread.

    Attributes:
        repos: ``repo_id -> {path: content}`` at the head of ``main`` (includes ``.gitattributes``);
            read it, but seed repos with :meth:`commit_files` so that ``history`` stays consistent.
        history: ``repo_id -> [Commit, ...]``, oldest first (the first one is the repo creation).
        fail_commits: when true, the commit endpoint answers ``fail_status`` (default 500).
        requests: ``"METHOD /path"`` of every request received, in order.
    """

    def __init__(self, user: str = DEFAULT_USER) -> None:
        self.user = user
        self.repos: dict[str, dict[str, bytes]] = {}
        self.history: dict[str, list[Commit]] = {}
        self.fail_commits = False
        self.fail_status = 500
        self.requests: list[str] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT`` (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state helpers ---------------------------------------------------------------------------

    def commit_files(self, repo_id: str, files: dict[str, bytes], message: str = "Upload files") -> Commit:
        """Test set-up helper: create ``repo_id`` if needed, then commit ``files`` on top of ``main``."""
        with self._lock:
            if repo_id not in self.history:
                self._create(repo_id)
            return self._add_commit(repo_id, message, {**self.repos[repo_id], **files})

    def _create(self, repo_id: str) -> Commit:
        """New repo whose initial commit holds a ``.gitattributes``, like on the Hub."""
        self.history[repo_id] = []
        return self._add_commit(repo_id, "initial commit", {".gitattributes": GITATTRIBUTES})

    def _add_commit(self, repo_id: str, message: str, files: dict[str, bytes]) -> Commit:
        seed = f"{repo_id}\0{message}\0{next(self._counter)}\0{time.time_ns()}".encode()
        commit = Commit(oid=hashlib.sha1(seed).hexdigest(), message=message, files=files)
        self.history[repo_id].append(commit)
        self.repos[repo_id] = files
        return commit

    def _resolve(self, repo_id: str, revision: str) -> Commit:
        if repo_id not in self.history:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        commits = self.history[repo_id]
        if revision == "main":
            return commits[-1]
        if len(revision) >= 7:
            for commit in reversed(commits):
                if commit.oid.startswith(revision.lower()):
                    return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


# Routes match the raw (still percent-encoded) path; groups are unquoted before use.
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("DELETE", r"^/api/repos/delete$", "delete_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$", "repo_info"),
        ("GET", rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$", "tree"),
        ("POST", rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$", "commit"),
        ("GET", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
        ("HEAD", rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to ``_route_*`` methods; HTTP/1.0, so every response closes the connection."""

    server_version = "LocalHub/1.0"

    @property
    def hub(self) -> LocalHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing --------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self.body = self._read_body()
        self.hub.requests.append(f"{method} {split.path}")
        try:
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(split.path)
                if route_method == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.hub._lock:
                        getattr(self, f"_route_{name}")(**args)
                    return
            raise HubError(501, f"LocalHub does not implement {method} {split.path}")
        except HubError as err:
            self._send_error(err)
        except ConnectionError:  # client went away mid-response
            pass
        except Exception as err:  # malformed payload or LocalHub bug: 400, because clients retry 5xx slowly
            self._send_error(HubError(400, f"LocalHub could not handle {method} {split.path}: {err!r}"))

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": " ".join(err.message.encode("ascii", "replace").decode().split())}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._send_json({"error": err.message}, err.status, headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Send a response; for HEAD, the headers (Content-Length included) without the body."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.hub.url}/{repo_id}"

    # -- routes ----------------------------------------------------------------------------------

    def _route_whoami(self) -> None:
        if not self.headers.get("Authorization"):
            raise HubError(401, "Invalid credentials in Authorization header")
        auth = {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}
        self._send_json({"type": "user", "name": self.hub.user, "fullname": "Test User", "orgs": [], "auth": auth})

    def _repo_id_from_payload(self) -> str:
        payload = self._json_body()
        if payload.get("type") not in (None, "model"):
            raise HubError(400, f"LocalHub only supports model repos, got type={payload.get('type')!r}")
        return f"{payload.get('organization') or self.hub.user}/{payload['name']}"

    def _route_create_repo(self) -> None:
        repo_id = self._repo_id_from_payload()
        if repo_id in self.hub.history:
            # The client reads "url" from the 409 body when exist_ok=True.
            self._send_json({"error": "You already created this model repo", "url": self._repo_url(repo_id)}, 409)
            return
        self.hub._create(repo_id)
        self._send_json({"url": self._repo_url(repo_id), "name": repo_id, "id": repo_id})

    def _route_delete_repo(self) -> None:
        repo_id = self._repo_id_from_payload()
        if repo_id not in self.hub.history:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        del self.hub.history[repo_id], self.hub.repos[repo_id]
        self._send_json({})

    def _route_validate_yaml(self) -> None:
        self._send_json({"errors": [], "warnings": []})

    def _route_repo_info(self, repo: str, rev: str = "main") -> None:
        commit = self.hub._resolve(repo, rev)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = [
            {"rfilename": path, **({"size": len(data), "blobId": git_blob_oid(data)} if with_blobs else {})}
            for path, data in sorted(commit.files.items())
        ]
        created = self.hub.history[repo][0].date
        self._send_json(
            {
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": created,
                **{"private": False, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": []},
                "siblings": siblings,
            }
        )

    def _route_tree(self, repo: str, rev: str, path: str = "") -> None:
        commit = self.hub._resolve(repo, rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        files, folders = [], set()
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(file_path)
        if prefix and not files and not folders:
            raise HubError(404, f"Path {path} does not exist", "EntryNotFound", commit.oid)
        entries = [
            {"type": "directory", "oid": hashlib.sha1(f"tree {folder}".encode()).hexdigest(), "size": 0, "path": folder}
            for folder in sorted(folders)
        ]
        for file_path in files:
            data = commit.files[file_path]
            entries.append({"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": file_path})
        self._send_json(entries)

    def _route_preupload(self, repo: str, rev: str) -> None:
        commit = self.hub._resolve(repo, rev)
        answers = []
        for item in self._json_body().get("files", []):
            existing = commit.files.get(item["path"])
            oid = git_blob_oid(existing) if existing is not None else None  # lets the client skip unchanged files
            answers.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answers, "commitOid": commit.oid})

    def _route_commit(self, repo: str, rev: str) -> None:
        if self.hub.fail_commits:
            raise HubError(self.hub.fail_status, "LocalHub: commit failure injected (fail_commits=True)")
        if self.query.get("create_pr"):
            raise HubError(501, "LocalHub does not support create_pr")
        if rev != "main":
            raise HubError(404, f"Invalid rev id: {rev} (LocalHub only has 'main')", "RevisionNotFound")
        head = self.hub._resolve(repo, rev)
        files = dict(head.files)
        summary = "Upload files"
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                summary = value.get("summary") or summary
                parent = value.get("parentCommit")
                if parent is not None and not head.oid.startswith(parent):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound", head.oid)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for file_path in [p for p in files if p.startswith(folder)]:
                    del files[file_path]
            else:
                # lfsFile never happens since preupload answers "regular" for every file.
                raise HubError(400, f"LocalHub does not support commit operation {key!r}")
        commit = self.hub._add_commit(repo, summary, files)
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _route_resolve(self, repo: str, rev: str, path: str) -> None:
        commit = self.hub._resolve(repo, rev)
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit.oid)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
        }
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if self.command == "GET" and range_match:
            start = int(range_match.group(1))
            end = min(int(range_match.group(2) or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers)
            return
        self._send(200, data, headers)
