"""A minimal Hugging Face Hub for tests: the HTTP endpoints that ``huggingface_hub`` (2.x, with Xet
disabled) calls for ``create_repo`` + ``upload_folder``, served on 127.0.0.1.

Endpoints (read from huggingface_hub's ``hf_api.py``, ``_commit_api.py`` and ``lfs.py``):

* ``POST /api/repos/create``                          create a repo (409 if it exists)
* ``GET  /api/models/{repo}``                          repo info (used by create_repo on 401/403)
* ``POST /api/validate-yaml``                          README front matter check: parses it and applies
                                                      the Hub's metadata rules (:func:`validate_metadata`)
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
        self.validated: list[tuple[dict, list[str]]] = []  # (front matter, errors) of each validate-yaml
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
            errors = validate_metadata(meta or {})
            with hub.lock:
                hub.validated.append((meta or {}, errors))
            if errors:
                return 400, {"error": "Invalid metadata", "errors": [{"message": e} for e in errors]}
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


# ----------------------------------------------------------------------------- metadata rules
# What the Hub checks when a README.md is uploaded (its validate-yaml endpoint), as documented in
# https://huggingface.co/docs/hub/model-cards (metadata spec) and the model-index spec in
# huggingface/hub-docs modelcard.md: `base_model` holds Hub model ids only (a local path is
# rejected), `base_model_relation` is one of four words, `datasets` are Hub dataset ids, and
# every model-index result has a task type, a dataset type (a dataset id) and name, and metrics
# with a type and a value.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
RELATIONS = ("adapter", "merge", "quantized", "finetune")


def is_repo_id(value) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= 96
        and bool(_REPO_ID.match(value))
        and ".." not in value
        and "--" not in value
        and not value.endswith((".", "-"))
    )


def _ids(meta: dict, key: str, kind: str) -> list[str]:
    value = meta.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [
        f'"{key}" with value "{v}" is not valid. It must be a {kind} id from the Hub, such as "org/name".'
        for v in values
        if not is_repo_id(v)
    ]


def validate_metadata(meta: dict) -> list[str]:
    """The error messages the Hub would give for this front matter (empty when it is accepted)."""
    errors = _ids(meta, "base_model", "model") + _ids(meta, "datasets", "dataset")
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in RELATIONS:
        errors.append(f'"base_model_relation" must be one of {", ".join(RELATIONS)}, got "{relation}"')
    for key in ("tags", "metrics"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(x, str) for x in meta[key])):
            errors.append(f'"{key}" must be a list of strings')
    if "model-index" in meta:
        errors += _model_index_errors(meta["model-index"])
    return errors


def _model_index_errors(index) -> list[str]:
    if not isinstance(index, list) or not index:
        return ['"model-index" must be a non-empty list']
    errors = []
    for i, entry in enumerate(index):
        where = f"model-index[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f'"{where}.name" is required (a string)')
            continue
        results = entry.get("results")
        if not isinstance(results, list) or not results:
            errors.append(f'"{where}.results" must be a non-empty list')
            continue
        for j, res in enumerate(results):
            at = f"{where}.results[{j}]"
            if not isinstance(res, dict):
                errors.append(f'"{at}" must be a mapping')
                continue
            if not isinstance((res.get("task") or {}).get("type"), str):
                errors.append(f'"{at}.task.type" is required')
            dataset = res.get("dataset") or {}
            if not isinstance(dataset.get("name"), str):
                errors.append(f'"{at}.dataset.name" is required')
            if not is_repo_id(dataset.get("type")):
                errors.append(
                    f'"{at}.dataset.type" must be a dataset id from the Hub, got "{dataset.get("type")}"'
                )
            metrics = res.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{at}.metrics" must be a non-empty list')
                continue
            for k, metric in enumerate(metrics):
                if (
                    not isinstance(metric, dict)
                    or not isinstance(metric.get("type"), str)
                    or "value" not in metric
                ):
                    errors.append(f'"{at}.metrics[{k}]" needs a "type" and a "value"')
    return errors


def _sha(repo: str, n: int) -> str:
    return hashlib.sha1(f"{repo}@{n}".encode()).hexdigest()
