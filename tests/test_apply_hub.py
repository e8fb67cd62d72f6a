"""`resolve_model` and `apply` with a Hub id, against a loopback server that speaks the Hub's download API.

The server answers the three calls huggingface_hub 2.4's snapshot_download makes (repo info at a revision, the
recursive tree listing, HEAD/GET of each file under /resolve/) from an in-memory repository, and records which
files were fetched, so the tests can check that pickle weights and Mistral-format duplicates are never downloaded.
"""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from apply_models import D_MODEL, save_checkpoint, tiny_llama
from safetensors.torch import load_file

from abliterate.apply import apply_direction, inspect_checkpoint
from abliterate.config import load_config
from abliterate.direction import save_direction
from abliterate.errors import UserError
from abliterate.hub import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub:
    """Repositories (name -> {path: bytes}) served on 127.0.0.1 with the Hub's URL layout."""

    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.fetched: list[str] = []  # whole files downloaded
        self.ranged: list[str] = []  # files of which only a byte range was read
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def _handler(hub: _Hub) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool) -> None:
            parts = unquote(urlparse(self.path).path).strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo, action, revision = "/".join(parts[2:4]), parts[4], parts[5]
            else:
                repo, action, revision = "/".join(parts[:2]), parts[2], parts[3]
            if repo not in hub.repos:
                return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
            if revision not in ("main", COMMIT):
                return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head)
            files = hub.repos[repo]
            if action == "revision":
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in files]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            if action == "tree":
                tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in files.items()]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            name = "/".join(parts[4:])
            if name not in files:
                return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
            data, status = files[name], 200
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if ranged and not head:  # safetensors header reads: only the first bytes of a file
                begin = int(ranged.group(1))
                end = min(int(ranged.group(2) or len(data) - 1), len(data) - 1)
                headers["Content-Range"] = f"bytes {begin}-{end}/{len(data)}"
                data, status = data[begin:end + 1], 206
                hub.ranged.append(name)
            elif not head:
                hub.fetched.append(name)
            self._send(status, data, headers, head)

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

    return Handler


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    return save_checkpoint(tiny_llama(torch.float32, n_layers=1), tmp_path_factory.mktemp("hub_llama"))


@pytest.fixture
def hub(local_model, monkeypatch, tmp_path):
    from huggingface_hub import constants

    files = {p.name: p.read_bytes() for p in local_model.iterdir()}
    extra = {"pytorch_model.bin": b"pickle", "consolidated.safetensors": b"mistral format",
             "original/consolidated.00.pth": b"pickle", "onnx/model.safetensors": b"onnx export"}
    server = _Hub({"tester/tiny": {**files, **extra},
                   "tester/bin-only": {"config.json": files["config.json"], "pytorch_model.bin": b"pickle"},
                   "tester/no-config": {"model.safetensors": files["model.safetensors"]}})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_download_fetches_safetensors_and_small_files_only(hub, local_model, tmp_path):
    path = resolve_model("tester/tiny", revision="main")
    expected = sorted(p.name for p in local_model.iterdir())
    assert sorted(p.name for p in path.iterdir()) == expected
    assert sorted(hub.fetched) == expected  # no .bin, no consolidated.*, no weights in subfolders
    assert (path / "model.safetensors").read_bytes() == (local_model / "model.safetensors").read_bytes()


def test_apply_from_hub_id_equals_apply_from_local_dir(hub, local_model, tmp_path):
    direction = save_direction(tmp_path / "d", torch.randn(D_MODEL), {})
    config = load_config(overrides={"model": {"revision": COMMIT}})
    apply_direction("tester/tiny", direction, tmp_path / "from_hub", config)
    apply_direction(str(local_model), direction, tmp_path / "from_dir", load_config())
    from_hub = load_file(str(tmp_path / "from_hub" / "model.safetensors"))
    from_dir = load_file(str(tmp_path / "from_dir" / "model.safetensors"))
    assert from_hub.keys() == from_dir.keys()
    assert all(torch.equal(from_hub[name], from_dir[name]) for name in from_hub)


@pytest.mark.parametrize("repo, revision, message", [
    ("tester/bin-only", "", "tester/bin-only has no .safetensors weights (only pickle weights"),
    ("tester/missing", "", "Model tester/missing is neither a local directory nor a Hub repository you can access"),
    ("tester/tiny", "no-such-branch", "Revision 'no-such-branch' does not exist in tester/tiny; fix --revision."),
])
def test_hub_errors(hub, repo, revision, message):
    with pytest.raises(UserError) as info:
        resolve_model(repo, revision)
    assert str(info.value).startswith(message)


def test_inspect_hub_id_reads_headers_without_downloading_weights(hub, local_model):
    remote = inspect_checkpoint("tester/tiny", None, load_config())
    local = inspect_checkpoint(str(local_model), None, load_config())
    assert remote.edits == local.edits and remote.untie == local.untie and remote.per_layer == local.per_layer
    assert "model.safetensors" in hub.ranged
    assert not any(name.endswith(".safetensors") for name in hub.fetched)


def test_inspect_hub_errors(hub):
    with pytest.raises(UserError, match="tester/bin-only has no .safetensors weights"):
        inspect_checkpoint("tester/bin-only", None, load_config())
    with pytest.raises(UserError, match="Model tester/missing is neither a local directory nor a Hub repository"):
        inspect_checkpoint("tester/missing", None, load_config())
    with pytest.raises(UserError, match=r"tester/no-config is not a model repository \(no config.json\)"):
        inspect_checkpoint("tester/no-config", None, load_config())
