"""A small in-memory Hugging Face Hub on 127.0.0.1, for testing `effine push` with the real huggingface_hub client.

It implements the endpoints that huggingface_hub (2.x) calls for create_repo, create_branch, get_paths_info,
model_info and create_commit with regular and LFS files (the legacy LFS transfer: tests turn Xet off, since
hf_xet speaks its own binary protocol to a separate storage server):

    POST /api/repos/create                          {name, organization, visibility}  -> 200 {url} | 409
    POST /api/models/{repo}/branch/{branch}         branch from main                  -> 200 | 409
    POST /api/models/{repo}/paths-info/{rev}        form paths=...   -> [{type, path, size, oid, lfs?}]
    GET  /api/models/{repo}                         model_info (cardData of the `base_cards` given)
    POST /api/validate-yaml                         README.md metadata check          -> 200 {}
    POST /api/models/{repo}/preupload/{rev}         -> {files: [{path, uploadMode, shouldIgnore, oid}]}
    POST /{repo}.git/info/lfs/objects/batch         LFS batch: an upload action unless the oid is stored
    PUT  /lfs-upload/{oid}                          the LFS content (sha256 checked against the oid)
    POST /api/models/{repo}/commit/{rev}            NDJSON: header, file (base64), lfsFile (oid)
    GET  /api/agent-harnesses                       the client's best-effort telemetry lookup -> 404

Writes need ``Authorization: Bearer <token>``. Every request is recorded (method, path, Authorization header);
``fail`` names endpoints that answer 500, to test failures. Anything else answers 404 and is recorded in
``unknown`` (a test asserts it stays empty: the client called nothing this server does not model).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")
LFS_MIN_SIZE = 10_000_000  # the Hub stores files above 10 MB in LFS whatever their name


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    repo: str
    branch: str
    summary: str
    regular: list[str]
    lfs: list[str]


@dataclass
class Repo:
    private: bool
    # A new Hub repo starts with one commit holding .gitattributes.
    branches: dict[str, dict[str, bytes]] = field(
        default_factory=lambda: {"main": {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}})
    lfs_paths: set[str] = field(default_factory=set)


class FakeHub:
    def __init__(self, token: str, base_cards: dict[str, dict] | None = None, fail: set[str] | None = None):
        self.token = token
        self.base_cards = base_cards or {}
        self.fail = set(fail or ())
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.lfs_puts: list[str] = []  # oids whose content was PUT
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_POST(self):
                hub._dispatch(self, "POST")

            def do_PUT(self):
                hub._dispatch(self, "PUT")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self.endpoint

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # -- helpers for tests ----------------------------------------------------------------------------------------
    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo].branches[branch])

    def delete(self, repo: str, path: str, branch: str = "main") -> None:
        del self.repos[repo].branches[branch][path]

    # -- HTTP -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _body(h: BaseHTTPRequestHandler) -> bytes:
        if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    h.rfile.readline()
                    return out
                out += h.rfile.read(size)
                h.rfile.readline()
        return h.rfile.read(int(h.headers.get("Content-Length") or 0))

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload=None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = url.path
        body = self._body(h) if method in ("POST", "PUT") else b""
        auth = h.headers.get("Authorization")
        with self.lock:
            self.requests.append((method, path, auth))
        routes = [
            ("POST", r"/api/repos/create", self._create_repo, "create"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)", self._create_branch, "branch"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>.+)", self._paths_info, "paths-info"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self._preupload, "preupload"),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self._commit, "commit"),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", self._model_info, "model-info"),
            ("POST", r"/api/validate-yaml", lambda h, b, **kw: self._send(h, 200, {}), "validate-yaml"),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch, "lfs-batch"),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self._lfs_put, "lfs-put"),
        ]
        for m, pattern, fn, name in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                if name in self.fail:
                    return self._send(h, 500, {"error": f"fake hub: {name} fails on purpose"})
                writes = name not in ("model-info", "lfs-put")  # LFS PUTs go to pre-signed URLs, without auth
                if writes and auth != f"Bearer {self.token}":
                    return self._send(h, 401, {"error": "Invalid credentials in Authorization header"})
                kw = {k: unquote(v) for k, v in match.groupdict().items()}
                with self.lock:
                    return fn(h, body, **kw)
        if path != "/api/agent-harnesses":  # the client's best-effort telemetry lookup; 404 is fine for it
            self.unknown.append(f"{method} {h.path}")
        self._send(h, 404, {"error": f"fake hub: no route for {method} {path}"})

    def _create_repo(self, h, body):
        req = json.loads(body)
        repo = f"{req['organization']}/{req['name']}"
        if repo in self.repos:
            return self._send(h, 409, {"error": "You already created this model repo",
                                       "url": f"{self.endpoint}/{repo}"})
        self.repos[repo] = Repo(private=req.get("visibility") == "private")
        self._send(h, 200, {"url": f"{self.endpoint}/{repo}", "name": repo})

    def _repo(self, h, repo: str, rev: str | None = None):
        if repo not in self.repos:
            self._send(h, 404, {"error": "Repository not found"})
            return None
        if rev is not None and rev not in self.repos[repo].branches:
            self._send(h, 404, {"error": f"Invalid rev id: {rev}"})
            return None
        return self.repos[repo]

    def _create_branch(self, h, body, repo, rev):
        r = self._repo(h, repo)
        if r is None:
            return
        if rev in r.branches:
            return self._send(h, 409, {"error": "Reference already exists"})
        r.branches[rev] = dict(r.branches["main"])
        self._send(h, 200, {})

    def _entry(self, r: Repo, path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
        if path in r.lfs_paths:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _paths_info(self, h, body, repo, rev):
        r = self._repo(h, repo, rev)
        if r is None:
            return
        paths = parse_qs(body.decode()).get("paths", [])
        files = r.branches[rev]
        self._send(h, 200, [self._entry(r, p, files[p]) for p in paths if p in files])

    def _preupload(self, h, body, repo, rev):
        r = self._repo(h, repo, rev)
        if r is None:
            return
        out = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            old = r.branches[rev].get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if f["path"] in r.lfs_paths
                                            else git_blob_id(old))
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._send(h, 200, {"files": out})

    def _lfs_batch(self, h, body, repo):
        req = json.loads(body)
        objects = []
        for o in req["objects"]:
            obj = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.lfs_store:
                obj["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{o['oid']}"}}
            objects.append(obj)
        self._send(h, 200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, h, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            return self._send(h, 400, {"error": "sha256 mismatch"})
        self.lfs_store[oid] = body
        self.lfs_puts.append(oid)
        self._send(h, 200, {})

    def _commit(self, h, body, repo, rev):
        r = self._repo(h, repo, rev)
        if r is None:
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        staged, regular, lfs = {}, [], []
        for x in lines:
            v = x["value"]
            if x["key"] == "file":
                staged[v["path"]] = base64.b64decode(v["content"])
                regular.append(v["path"])
            elif x["key"] == "lfsFile":
                if v["oid"] not in self.lfs_store:
                    return self._send(h, 422, {"error": f"LFS object {v['oid']} was never uploaded"})
                staged[v["path"]] = self.lfs_store[v["oid"]]
                lfs.append(v["path"])
        r.branches[rev].update(staged)
        r.lfs_paths.update(lfs)
        r.lfs_paths.difference_update(regular)
        self.commits.append(Commit(repo, rev, header["summary"], regular, lfs))
        oid = hashlib.sha1(f"{repo}{rev}{len(self.commits)}".encode()).hexdigest()
        self._send(h, 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "success": True})

    def _model_info(self, h, body, repo):
        if repo not in self.base_cards:
            return self._send(h, 404, {"error": "Repository not found"})
        self._send(h, 200, {"id": repo, "sha": "0" * 40, "cardData": self.base_cards[repo]})
