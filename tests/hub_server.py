"""A minimal Hugging Face Hub for tests: the HTTP endpoints that ``huggingface_hub`` (2.x, with Xet
disabled) calls for ``create_repo`` + ``upload_folder``, served on 127.0.0.1.

Endpoints (read from huggingface_hub's ``hf_api.py``, ``_commit_api.py`` and ``lfs.py``):

* ``POST /api/repos/create``                          create a repo (409 if it exists)
* ``GET  /api/models/{repo}``                          repo info (used by create_repo on 401/403)
* ``POST /api/validate-yaml``                          README front matter check (really parses it)
* ``POST /api/models/{repo}/preupload/{rev}``          says "lfs" for large / ``*.safetensors`` files
* ``POST /{repo}.git/info/lfs/objects/batch``          LFS batch API, "basic" transfer to this server
* ``PUT  /lfs-objects/{oid}``                          LFS upload (sha256 checked)
* ``POST /lfs-objects/verify``                         LFS verify
* ``POST /api/models/{repo}/commit/{rev}``             NDJSON commit: regular files (base64) and LFS pointers

Everything received is kept in ``HubServer.repos[repo_id]["files"]`` (path -> bytes) and
``HubServer.requests`` (method, path), so tests assert on what actually went over the wire.
``reject_all=True`` answers 401 to every request. Loopback only, request bodies capped, and the
server thread stops when the ``with`` block (or ``stop()``) ends.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

MAX_BODY = 64 * 2**20
LFS_THRESHOLD = 10 * 2**20  # the Hub's rule: files over 10 MB, or matching .gitattributes LFS patterns


class HubServer:
    def __init__(self, token: str | None = "hf_test_token", reject_all: bool = False):
        self.token = token
        self.reject_all = reject_all
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(/revision/[^/]+)?$"), "repo_info"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-objects/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
    ("POST", re.compile(r"^/lfs-objects/verify$"), "lfs_verify"),
]


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = 30
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
                    if len(out) > MAX_BODY:
                        raise ValueError("body too large")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise ValueError("body too large")
            return self.rfile.read(length)

        def _send(self, status: int, payload: dict | None = None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status >= 400 and payload and "error" in payload:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            with hub.lock:
                hub.requests.append((method, path))
            try:
                body = self._body()
            except ValueError as err:
                self._send(413, {"error": str(err)})
                return
            if hub.reject_all or (
                hub.token
                and not path.startswith("/lfs-objects/")
                and self.headers.get("Authorization") != f"Bearer {hub.token}"
            ):
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return
            for verb, pattern, name in _ROUTES:
                m = pattern.match(path)
                if verb == method and m:
                    status, payload = getattr(self, name)(body, **m.groupdict())
                    self._send(status, payload)
                    return
            self._send(404, {"error": f"no route {method} {path}"})

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        # -------------------------------------------------------------- endpoints
        def create(self, body: bytes) -> tuple[int, dict]:
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            with hub.lock:
                if repo_id in hub.repos:
                    return 409, {
                        "error": "You already created this model repo",
                        "url": f"{hub.url}/{repo_id}",
                    }
                hub.repos[repo_id] = {"request": req, "files": {}, "commits": []}
            return 200, {"url": f"{hub.url}/{repo_id}", "name": repo_id}

        def repo_info(self, body: bytes, repo: str) -> tuple[int, dict]:
            if repo not in hub.repos:
                return 404, {"error": "Repository not found"}
            return 200, {"id": repo, "sha": _sha(repo, len(hub.repos[repo]["commits"])), "siblings": []}

        def validate_yaml(self, body: bytes) -> tuple[int, dict]:
            content = json.loads(body)["content"]
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(m.group(1)) if m else None
            except yaml.YAMLError as err:
                return 400, {"error": "Invalid YAML", "errors": [{"message": str(err)}]}
            if m and not isinstance(meta, dict):
                return 400, {
                    "error": "Invalid YAML",
                    "errors": [{"message": "front matter is not a mapping"}],
                }
            return 200, {"errors": [], "warnings": []}

        def preupload(self, body: bytes, repo: str, rev: str) -> tuple[int, dict]:
            if repo not in hub.repos:
                return 404, {"error": "Repository not found"}
            files = json.loads(body)["files"]
            return 200, {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs"
                        if f["size"] > LFS_THRESHOLD or f["path"].endswith(".safetensors")
                        else "regular",
                        "shouldIgnore": False,
                        "oid": None,
                    }
                    for f in files
                ]
            }

        def lfs_batch(self, body: bytes, repo: str) -> tuple[int, dict]:
            req = json.loads(body)
            objects = []
            for obj in req["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs-objects/{obj['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs-objects/verify"},
                    }
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}

        def lfs_put(self, body: bytes, oid: str) -> tuple[int, dict]:
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, {"error": "sha256 of the uploaded content does not match the oid"}
            with hub.lock:
                hub.lfs[oid] = body
            return 200, {}

        def lfs_verify(self, body: bytes) -> tuple[int, dict]:
            req = json.loads(body)
            ok = req["oid"] in hub.lfs and len(hub.lfs[req["oid"]]) == req["size"]
            return (200, {}) if ok else (404, {"error": "object not uploaded"})

        def commit(self, body: bytes, repo: str, rev: str) -> tuple[int, dict]:
            if repo not in hub.repos:
                return 404, {"error": "Repository not found"}
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                return 400, {"error": "commit payload must start with a header line"}
            files = {}
            for item in lines[1:]:
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return 400, {"error": f"LFS object for {value['path']} was never uploaded"}
                    files[value["path"]] = hub.lfs[value["oid"]]
                else:
                    return 400, {"error": f"unsupported commit operation {item['key']}"}
            with hub.lock:
                state = hub.repos[repo]
                state["files"].update(files)
                state["commits"].append(lines[0]["value"])
                oid = _sha(repo, len(state["commits"]))
            return 200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}

    return Handler


def _sha(repo: str, n: int) -> str:
    return hashlib.sha1(f"{repo}@{n}".encode()).hexdigest()
