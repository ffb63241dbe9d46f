"""A stand-in for the Hugging Face hub on loopback, enough for huggingface_hub's own client.

Serves directories as model repos: `GET /api/models/{repo}[/revision/{rev}]` (model info with file sizes),
`GET /api/models/{repo}/tree/{rev}` (the file list snapshot_download reads), and `HEAD`/`GET
/{repo}/resolve/{rev}/{file}` with the headers the client checks (X-Repo-Commit, ETag, Content-Length) and byte
ranges. Every request is counted by (method, file) (ranged GETs as "GET-RANGE"), and hooks can cut a download short and then act (e.g. kill
the client) to test interrupted transfers.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlsplit


class Repo:
    def __init__(self, path: Path):
        self.path = path
        self.files = {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}
        digest = hashlib.sha1("".join(f"{n}:{p.stat().st_size}" for n, p in self.files.items()).encode())
        self.sha = digest.hexdigest()  # a 40-hex "commit"
        self.etags = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in self.files.items()}

    def entry(self, name: str, tree: bool) -> dict:
        size = self.files[name].stat().st_size
        lfs = name.endswith(".safetensors")  # the tree and model-info endpoints spell LFS details differently
        if tree:
            return {"type": "file", "path": name, "size": size, "oid": self.etags[name][:40],
                    "lfs": {"oid": self.etags[name], "size": size, "pointerSize": 134} if lfs else None}
        return {"rfilename": name, "size": size, "blobId": self.etags[name][:40],
                "lfs": {"sha256": self.etags[name], "size": size, "pointerSize": 134} if lfs else None}


class StandInHub:
    """`with StandInHub({"org/name": dir}) as hub:` ... `hub.url`, `hub.requests`, `hub.on_get`."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {rid: Repo(Path(p)) for rid, p in repos.items()}
        self.requests: Counter = Counter()
        # on_get(file) -> how many bytes of it to send before cutting the connection (None: all), then on_cut(file)
        self.on_get: Callable[[str], int | None] | None = None
        self.on_cut: Callable[[str], None] | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "StandInHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, suffix: str = ".safetensors") -> Counter:
        return Counter({f: n for (m, f), n in self.requests.items() if m == "GET" and f.endswith(suffix)})


def _handler(hub: StandInHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, data) -> None:
            body = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _missing(self) -> None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.send_header("X-Error-Code", "EntryNotFound")
            self.end_headers()

        def _route(self, method: str) -> None:
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo = hub.repos.get(f"{parts[2]}/{parts[3]}")
                hub.requests[(method, "/".join(parts[4:5]) or "info")] += 1
                if repo is None:
                    return self._missing()
                if len(parts) > 4 and parts[4] == "tree":
                    return self._json([repo.entry(n, tree=True) for n in repo.files])
                return self._json({"id": f"{parts[2]}/{parts[3]}", "sha": repo.sha,
                                   "siblings": [repo.entry(n, tree=False) for n in repo.files]})
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, name = hub.repos.get(f"{parts[0]}/{parts[1]}"), "/".join(parts[4:])
                ranged = method == "GET" and self.headers.get("Range")  # a header read, not a download
                hub.requests[("GET-RANGE" if ranged else method, name)] += 1
                if repo is None or name not in repo.files:
                    return self._missing()
                return self._file(method, repo, name)
            self._missing()

        def _file(self, method: str, repo: Repo, name: str) -> None:
            data = repo.files[name].read_bytes()
            start, end, status = 0, len(data), 200
            wanted = self.headers.get("Range")
            if wanted and method == "GET":  # "bytes=START-[END]"
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                start, end, status = int(first), (int(last) + 1 if last else len(data)), 206
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("ETag", f'"{repo.etags[name]}"')
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if method == "HEAD":
                return
            cut = hub.on_get(name) if hub.on_get else None
            self.wfile.write(data[start:end] if cut is None else data[start:start + cut])
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True
                if hub.on_cut:
                    hub.on_cut(name)

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

    return Handler
