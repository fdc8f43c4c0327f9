"""A local fake Hugging Face Hub: only its HTTP servers are fake, huggingface_hub's real client talks to it.

It implements just the endpoints the client uses for ``create_repo`` + ``upload_folder`` (preupload
answered with upload mode "regular", so file contents travel base64-encoded inside the NDJSON
commit) and for ``snapshot_download`` (revision info, tree, resolve). It records every commit;
faults (HTTP 500) are injected per endpoint. The ``fake_hub`` fixture (tests/conftest.py) starts one.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

TOKEN = "hf_test_token"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "files": {path: bytes}, "sha": str}
        self.commits: list[dict] = []  # {"repo_id", "summary", "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}  # endpoint kind -> number of 500s still to return
        self.failed: dict[str, int] = {}
        self.fail_times: list[float] = []  # time.monotonic() of each injected failure
        self.commit_times: list[float] = []
        self.auth_headers: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _inject(self, kind: str) -> bool:
        with self.lock:
            if self.fail.get(kind, 0) > 0:
                self.fail[kind] -= 1
                self.failed[kind] = self.failed.get(kind, 0) + 1
                self.fail_times.append(time.monotonic())
                return True
        return False

    def _handler(self):
        hubsrv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, code: int, payload=None, headers=None, body: bytes | None = None, head=False):
                if body is None:
                    body = json.dumps(payload if payload is not None else {}).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _route(self, method: str):
                path = unquote(urlparse(self.path).path)
                body = self._body() if method in ("POST", "PUT") else b""
                with hubsrv.lock:
                    hubsrv.requests.append((method, path))
                    if self.headers.get("Authorization"):
                        hubsrv.auth_headers.add(self.headers["Authorization"])
                m = None
                if method == "POST" and path == "/api/repos/create":
                    if hubsrv._inject("create"):
                        return self._send(500, {"error": "injected failure"})
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    with hubsrv.lock:
                        if repo_id in hubsrv.repos:
                            return self._send(409, {"error": "You already created this model repo",
                                                    "url": f"{hubsrv.url}/{repo_id}"})
                        hubsrv.repos[repo_id] = {"private": req.get("visibility") == "private",
                                                 "files": {}, "sha": "0" * 40}
                    return self._send(200, {"url": f"{hubsrv.url}/{repo_id}", "name": repo_id})
                if method == "POST" and path == "/api/validate-yaml":
                    return self._send(200, {})
                if method == "POST" and (m := re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path)):
                    if hubsrv._inject("preupload"):
                        return self._send(500, {"error": "injected failure"})
                    if m.group(1) not in hubsrv.repos:
                        return self._send(404, {"error": "Repository not found"},
                                          headers={"X-Error-Code": "RepoNotFound"})
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False, "oid": None} for f in files]})
                if method == "POST" and (m := re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path)):
                    if hubsrv._inject("commit"):
                        return self._send(500, {"error": "injected failure"})
                    repo_id = m.group(1)
                    if repo_id not in hubsrv.repos:
                        return self._send(404, {"error": "Repository not found"},
                                          headers={"X-Error-Code": "RepoNotFound"})
                    lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    files = {}
                    for x in lines:
                        if x["key"] == "file":
                            assert x["value"]["encoding"] == "base64"
                            files[x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                        elif x["key"] != "header":
                            return self._send(400, {"error": f"unsupported operation {x['key']}"})
                    sha = hashlib.sha1(body).hexdigest()
                    with hubsrv.lock:
                        hubsrv.repos[repo_id]["files"].update(files)
                        hubsrv.repos[repo_id]["sha"] = sha
                        hubsrv.commits.append({"repo_id": repo_id, "summary": header["summary"], "files": files})
                        hubsrv.commit_times.append(time.monotonic())
                    return self._send(200, {"commitUrl": f"{hubsrv.url}/{repo_id}/commit/{sha}",
                                            "commitOid": sha, "success": True})
                # ---- read side (snapshot_download)
                if method == "GET" and (m := re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path)):
                    repo = hubsrv.repos.get(m.group(1))
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"},
                                          headers={"X-Error-Code": "RepoNotFound"})
                    return self._send(200, {"id": m.group(1), "modelId": m.group(1), "sha": repo["sha"],
                                            "private": repo["private"],
                                            "siblings": [{"rfilename": p} for p in sorted(repo["files"])]})
                if method == "GET" and (m := re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path)):
                    repo = hubsrv.repos.get(m.group(1))
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"},
                                          headers={"X-Error-Code": "RepoNotFound"})
                    entries = [{"type": "file", "path": p, "size": len(b),
                                "oid": hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()}
                               for p, b in sorted(repo["files"].items())]
                    return self._send(200, entries)
                if method in ("GET", "HEAD") and (m := re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)):
                    repo = hubsrv.repos.get(m.group(1))
                    if repo is None or m.group(3) not in repo["files"]:
                        return self._send(404, {"error": "Entry not found"},
                                          headers={"X-Error-Code": "EntryNotFound"}, head=method == "HEAD")
                    data = repo["files"][m.group(3)]
                    etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                    return self._send(200, body=data, head=method == "HEAD", headers={
                        "ETag": f'"{etag}"', "X-Repo-Commit": repo["sha"], "Content-Type": "application/octet-stream"})
                return self._send(404, {"error": f"fake hub: no route for {method} {path}"})

            def do_GET(self):
                self._route("GET")

            def do_HEAD(self):
                self._route("HEAD")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

        return Handler
