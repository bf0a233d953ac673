"""A small Hub-compatible HTTP server on 127.0.0.1 for tests: just the endpoints huggingface_hub
uses to resolve, inspect, download (model info, tree, resolve with ranges) and to publish
(create repo, preupload, commit). See ../shared/spec/hub-protocol.md. Every request is recorded,
with the bytes of file content sent, so tests can prove what was (not) downloaded."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlparse


def _sha1(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: Dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: Dict[str, Dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    commit_log: List[dict] = field(default_factory=list)


class HubState:
    def __init__(self):
        self.repos: Dict[str, Repo] = {}
        self.requests: List[dict] = []
        self.fail_commits = 0  # answer the next N commits with 500
        self.lock = threading.Lock()

    def add_folder(self, repo_id: str, folder, branch: str = "main", message: str = "upload") -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
        return self.commit(repo_id, files, branch=branch, message=message)

    def commit(self, repo_id: str, files: Dict[str, bytes], *, branch: str = "main", message: str = "",
               deleted: Tuple[str, ...] = (), parent_from: Optional[str] = None, private: bool = False) -> str:
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        parent = repo.branches.get(parent_from or branch) or repo.branches.get("main")
        content = dict(repo.commits.get(parent, {})) if parent else {}
        content.update(files)
        for d in deleted:
            content.pop(d, None)
        sha = _sha1(json.dumps({"parent": parent, "files": sorted((k, _sha1(v)) for k, v in content.items()), "msg": message,
                                "n": len(repo.commit_log)}).encode())
        repo.commits[sha] = content
        repo.branches[branch] = sha
        repo.commit_log.append({"sha": sha, "branch": branch, "message": message, "files": sorted(files)})
        return sha

    def resolve(self, repo_id: str, rev: str) -> Optional[str]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        if rev in repo.commits:
            return rev
        return repo.branches.get(rev)

    def bytes_sent(self, suffix: str = "") -> int:
        return sum(r["sent"] for r in self.requests if r["path"].endswith(suffix))


_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # ---------------------------------------------------------------- helpers
    def _send(self, code: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None, ctype="application/json",
              head: bool = False, content_bytes: int = 0):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self._record["status"] = code
        self._record["sent"] = 0 if head else content_bytes

    def _json(self, code: int, obj, headers=None):
        self._send(code, json.dumps(obj).encode(), headers)

    def _error(self, code: int, error_code: str, message: str, head=False):
        self._send(code, json.dumps({"error": message}).encode(), {"X-Error-Code": error_code, "X-Error-Message": message},
                   head=head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _start(self, method):
        u = urlparse(self.path)
        self._record = {"method": method, "path": unquote(u.path), "query": parse_qs(u.query),
                        "range": self.headers.get("Range"), "auth": self.headers.get("Authorization"), "sent": 0}
        with self.state.lock:
            self.state.requests.append(self._record)
        return unquote(u.path), parse_qs(u.query)

    # ---------------------------------------------------------------- verbs
    def do_HEAD(self):
        self._get(head=True)

    def do_GET(self):
        self._get(head=False)

    def _get(self, head: bool):
        path, query = self._start("HEAD" if head else "GET")
        st = self.state
        m = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>.+))?", path)
        if m:
            sha = st.resolve(m["repo"], m["rev"] or "main")
            if m["repo"] not in st.repos:
                return self._error(404, "RepoNotFound", f"Repository {m['repo']} not found", head)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {m['rev']}", head)
            files = st.repos[m["repo"]].commits[sha]
            return self._json(200, {"id": m["repo"], "modelId": m["repo"], "sha": sha, "private": st.repos[m["repo"]].private,
                                    "siblings": [{"rfilename": f} for f in sorted(files)], "tags": [], "downloads": 0, "likes": 0})
        m = re.fullmatch(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
        if m:
            sha = st.resolve(m["repo"], m["rev"])
            if sha is None:
                return self._error(404, "RepoNotFound" if m["repo"] not in st.repos else "RevisionNotFound", "not found", head)
            files = st.repos[m["repo"]].commits[sha]
            sub = (m["sub"] or "").strip("/")
            items = [{"type": "file", "path": f, "size": len(b), "oid": _sha1(b)} for f, b in sorted(files.items())
                     if not sub or f.startswith(sub + "/")]
            return self._json(200, items)
        m = re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if m:
            if m["repo"] not in st.repos:
                return self._error(404, "RepoNotFound", f"Repository {m['repo']} not found", head)
            sha = st.resolve(m["repo"], m["rev"])
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {m['rev']}", head)
            files = st.repos[m["repo"]].commits[sha]
            if m["file"] not in files:
                return self._error(404, "EntryNotFound", f"{m['file']} does not exist", head)
            data = files[m["file"]]
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            headers = {"ETag": etag, "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
            rng = self.headers.get("Range")
            if rng and not head:
                mm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                a = int(mm.group(1))
                b = min(int(mm.group(2)) if mm.group(2) else len(data) - 1, len(data) - 1)
                part = data[a:b + 1]
                headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
                return self._send(206, part, headers, "application/octet-stream", content_bytes=len(part))
            if head:
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self._record["status"] = 200
                return
            return self._send(200, data, headers, "application/octet-stream", content_bytes=len(data))
        return self._error(404, "NotFound", f"no route for GET {path}", head)

    def do_POST(self):
        path, query = self._start("POST")
        st = self.state
        body = self._body()
        if path == "/api/repos/create":
            req = json.loads(body or b"{}")
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            self._record["json"] = req
            if repo_id in st.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{self._base()}/{repo_id}"})
            st.repos[repo_id] = Repo(private=bool(req.get("private")) or req.get("visibility") == "private")
            st.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, message="initial commit")
            return self._json(200, {"url": f"{self._base()}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        m = re.fullmatch(rf"/api/models/{_REPO}/branch/(?P<branch>.+)", path)
        if m:
            repo = st.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {m['repo']} not found")
            if m["branch"] in repo.branches:
                return self._json(409, {"error": "Reference already exists"})
            req = json.loads(body or b"{}")
            repo.branches[m["branch"]] = repo.branches.get(req.get("startingPoint") or "main")
            return self._json(200, {})
        m = re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", path)
        if m:
            req = json.loads(body or b"{}")
            return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                              for f in req.get("files", [])]})
        m = re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>.+)", path)
        if m:
            if st.fail_commits > 0:
                st.fail_commits -= 1
                return self._error(500, "InternalError", "simulated server failure")
            repo_id, rev = m["repo"], m["rev"]
            if repo_id not in st.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            header, files, deleted = {}, {}, []
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                if item["key"] == "header":
                    header = item["value"]
                elif item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    deleted.append(item["value"]["path"])
                else:
                    return self._error(400, "BadRequest", f"unsupported commit line {item['key']}")
            create_pr = query.get("create_pr", ["0"])[0] in ("1", "true", "True")
            self._record["commit"] = {"header": header, "files": sorted(files), "create_pr": create_pr, "revision": rev}
            repo = st.repos[repo_id]
            branch = rev
            if create_pr:
                n = sum(1 for b in repo.branches if b.startswith("refs/pr/")) + 1
                branch = f"refs/pr/{n}"
            sha = st.commit(repo_id, files, branch=branch, message=header.get("summary", ""), deleted=tuple(deleted),
                            parent_from=rev)
            out = {"commitUrl": f"{self._base()}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}
            if create_pr:
                out["pullRequestUrl"] = f"{self._base()}/{repo_id}/discussions/{branch.split('/')[-1]}"
            return self._json(200, out)
        return self._error(404, "NotFound", f"no route for POST {path}")

    def _base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


class HubServer:
    """``with HubServer() as hub: hub.endpoint, hub.state``"""

    def __init__(self):
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
