"""A loopback stand-in for the Hugging Face Hub's upload endpoints, for tests of `abliterate push`.

It speaks just the wire format huggingface_hub 2.4 uses for create_repo, create_branch, validate-yaml,
preupload, the LFS batch API (plain "basic" transfers: the client is told to skip Xet by the tests) and the
NDJSON commit endpoint, and keeps what was committed in memory so that tests can compare it byte for byte
with the local folder. The server binds 127.0.0.1 on a free port, serves from a daemon thread and shuts itself
down after `lifetime_s` even if a test forgets to stop it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[tuple[str, str]] = field(default_factory=list)  # (branch, commit summary)


class FakeHub:
    """State of the fake Hub plus the HTTP server that exposes it."""

    def __init__(self, token: str, lifetime_s: float = 120.0) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}  # sha256 hex -> content
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.lfs_puts: list[str] = []  # oids uploaded through the LFS PUT endpoint
        self.fail_next_commit = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), type("BoundHandler", (Handler,), {"hub": self}))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True

    def start(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo].branches[branch])


class Handler(BaseHTTPRequestHandler):
    """One request against `hub` (set on a per-server subclass by FakeHub)."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        self.hub.requests.append((method, self.path))
        body = self._read_body()
        if self.headers.get("authorization") != f"Bearer {self.hub.token}" and not self.path.startswith("/lfs-upload/"):
            return self._reply(401, {"error": "Invalid credentials"}, {"X-Error-Message": "Invalid credentials"})
        for pattern, route_method, action in ROUTES:
            match = re.fullmatch(pattern, self.path.split("?")[0])
            if match and route_method == method:
                return action(self, body, *match.groups())
        self._reply(404, {"error": f"no route for {method} {self.path}"})

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _reply(self, status: int, payload: object, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def create_repo(self, body: bytes) -> None:
        request = json.loads(body)
        repo_id = f"{request['organization']}/{request['name']}"
        if repo_id in self.hub.repos:
            # The real Hub's conflict answer carries the URL too; the client reads it even on 409.
            return self._reply(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
        self.hub.repos[repo_id] = Repo(private=request.get("visibility") == "private")
        self._reply(200, {"url": f"{self.hub.url}/{repo_id}"})

    def repo_info(self, body: bytes, repo_id: str) -> None:
        if repo_id not in self.hub.repos:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        self._reply(200, {"id": repo_id, "sha": "0" * 40, "private": self.hub.repos[repo_id].private})

    def create_branch(self, body: bytes, repo_id: str, branch: str) -> None:
        branches = self.hub.repos[repo_id].branches
        if branch in branches:
            return self._reply(409, {"error": "Reference already exists"})
        branches[branch] = dict(branches["main"])
        self._reply(200, {})

    def validate_yaml(self, body: bytes) -> None:
        self._reply(200, {"errors": [], "warnings": []})

    def preupload(self, body: bytes, repo_id: str, revision: str) -> None:
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                  "shouldIgnore": False, "oid": None} for f in json.loads(body)["files"]]
        self._reply(200, {"files": files})

    def lfs_batch(self, body: bytes, repo_id: str) -> None:
        objects = []
        for item in json.loads(body)["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.hub.lfs_store:  # already stored objects get no actions: nothing to send
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{item['oid']}"}}
            objects.append(entry)
        self._reply(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._reply(400, {"error": "sha256 mismatch"})
        self.hub.lfs_store[oid] = body
        self.hub.lfs_puts.append(oid)
        self._reply(200, {})

    def commit(self, body: bytes, repo_id: str, revision: str) -> None:
        if self.hub.fail_next_commit:
            self.hub.fail_next_commit = False
            return self._reply(500, {"error": "Internal Error"})
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        staged = dict(self.hub.repos[repo_id].branches[revision])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs_store:
                    return self._reply(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                staged[value["path"]] = self.hub.lfs_store[value["oid"]]
        self.hub.repos[repo_id].branches[revision] = staged
        self.hub.repos[repo_id].commits.append((revision, lines[0]["value"]["summary"]))
        oid = hashlib.sha1(body).hexdigest()
        self._reply(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

_REPO = r"([^/]+/[^/]+)"
ROUTES = [
    (r"/api/repos/create", "POST", Handler.create_repo),
    (rf"/api/models/{_REPO}", "GET", Handler.repo_info),
    (rf"/api/models/{_REPO}/branch/([^/]+)", "POST", Handler.create_branch),
    (r"/api/validate-yaml", "POST", Handler.validate_yaml),
    (rf"/api/models/{_REPO}/preupload/([^/]+)", "POST", Handler.preupload),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", Handler.lfs_batch),
    (r"/lfs-upload/([0-9a-f]{64})", "PUT", Handler.lfs_upload),
    (rf"/api/models/{_REPO}/commit/([^/]+)", "POST", Handler.commit),
]
