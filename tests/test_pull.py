"""`foveal pull` against a fake Hugging Face Hub on loopback: the CLI in a subprocess with HF_ENDPOINT
pointing at it and HF_HOME in a tmp folder; then `foveal.load("hf:ORG/NAME")` with the hub gone.

The fake hub serves the endpoints huggingface_hub's snapshot_download calls: repo info
(`/api/models/{repo}/revision/{rev}`), the file tree (`/api/models/{repo}/tree/{rev}`) and
`/{repo}/resolve/{rev}/{file}` (HEAD and GET, with X-Repo-Commit, ETag, Content-Length, Range)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import foveal
import tiny
from foveal.errors import ModelNotFoundError

pytest.importorskip("huggingface_hub")

REPO = "tiny-org/tiny-llava"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SRC = Path(__file__).resolve().parents[1] / "src"


class FakeHub:
    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.cut_once = files, [], set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _send(self, status, data=b"", headers=None, body=True):
                self.send_response(status)
                for k, v in {"Content-Length": str(len(data)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _not_found(self, code, body):
                self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code,
                                                                       "Content-Type": "application/json"}, body)

            def _serve(self, body):
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
                    if repo != REPO:
                        return self._not_found("RepoNotFound", body)
                    if rev not in ("main", COMMIT):
                        return self._not_found("RevisionNotFound", body)
                    if kind == "revision":
                        info = {"id": REPO, "sha": COMMIT, "private": False,
                                "siblings": [{"rfilename": f} for f in hub.files]}
                    else:
                        info = [{"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                for f, d in hub.files.items()]
                    return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                repo, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if repo != REPO or parts[2:3] != ["resolve"]:
                    return self._not_found("RepoNotFound", body)
                if file not in hub.files:
                    return self._not_found("EntryNotFound", body)
                data = hub.files[file]
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                           "Accept-Ranges": "bytes"}
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                if not body:
                    return self._send(200, data, headers, body=False)
                if file in hub.cut_once:        # the connection drops half-way, once
                    hub.cut_once.discard(file)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if start:
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    self.send_response(206)
                    self.send_header("Content-Length", str(len(data) - start))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data[start:])
                    return
                self._send(200, data, headers)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory):
    folder = tiny.build_llava(tmp_path_factory.mktemp("pull-src") / "model")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"pickled weights foveal never loads"
    return files


def run_pull(hf_home: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "PYTHONPATH": str(SRC),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "foveal.cli", "pull", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_pull_then_load_offline(tmp_path, repo_files, monkeypatch):
    with FakeHub(repo_files) as hub:
        out = run_pull(tmp_path, hub.url, f"hf:{REPO}")
    assert out.returncode == 0, out.stderr
    assert f"pulled {REPO}" in out.stdout and f"foveal run hf:{REPO}" in out.stdout
    fetched = {path.split("/resolve/")[1].split("/", 1)[1] for _, path, _ in hub.requests if "/resolve/" in path}
    assert fetched == set(repo_files) - {"pytorch_model.bin"}        # only what loading reads
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llava" / "snapshots" / COMMIT
    assert (tmp_path / "hub" / "models--tiny-org--tiny-llava" / "refs" / "main").read_text() == COMMIT
    assert (snapshot / "model.safetensors").read_bytes() == repo_files["model.safetensors"]

    # the hub is gone: loading reads the cache only
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    vlm = foveal.load(f"hf:{REPO}", dtype="float32")
    assert vlm.generate([foveal.user("hi")], max_tokens=2).finish_reason in ("length", "stop")


def test_pull_resumes_a_cut_download(tmp_path):
    """huggingface_hub writes 10 MiB chunks, so the cut falls after the first one; the retry asks for the rest."""
    data = bytes(range(256)) * (24 * 2**20 // 256)
    with FakeHub({"shard.safetensors": data}) as hub:
        hub.cut_once.add("shard.safetensors")
        out = run_pull(tmp_path, hub.url, REPO, "--include", "*.safetensors")
    assert out.returncode == 0, out.stderr
    ranges = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith("shard.safetensors")]
    assert ranges[0] is None and ranges[-1] is not None and int(ranges[-1].split("=")[1].rstrip("-")) >= 2**20
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llava" / "snapshots" / COMMIT
    assert (snapshot / "shard.safetensors").read_bytes() == data
    assert "does not load from these files yet" in out.stderr      # --include left config.json out


def test_unknown_repo_says_so(tmp_path, repo_files):
    with FakeHub(repo_files) as hub:
        out = run_pull(tmp_path, hub.url, "hf:nobody/nothing")
    assert out.returncode == 1
    assert "error: no model nobody/nothing on http://127.0.0.1" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_revision_says_so(tmp_path, repo_files):
    with FakeHub(repo_files) as hub:
        out = run_pull(tmp_path, hub.url, REPO, "--revision", "v9")
    assert out.returncode == 1 and "has no revision 'v9'" in out.stderr


def test_no_network_says_so(tmp_path):
    with socket.socket() as s:      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = run_pull(tmp_path, dead, f"hf:{REPO}")
    assert out.returncode == 1
    assert f"error: cannot reach {dead}" in out.stderr and "check the network" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_model_error_names_the_pull_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(ModelNotFoundError, match=r"foveal pull hf:tiny-org/tiny-llava"):
        foveal.load(f"hf:{REPO}")


def test_malformed_reference_is_refused_before_any_download(tmp_path):
    out = run_pull(tmp_path, "http://127.0.0.1:9", "not-a-repo")
    assert out.returncode == 1 and "expected hf:ORG/NAME" in out.stderr
