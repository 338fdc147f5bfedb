"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for testing `align push` offline.

It implements the part of the Hub HTTP API that `huggingface_hub` uses to create a model repository,
commit files inline (base64 in an ndjson commit, never LFS/Xet), and download a snapshot:

    GET    /api/whoami-v2
    POST   /api/repos/create                     {"name", "organization", "visibility"}
    DELETE /api/repos/delete                     {"name", "organization"}
    POST   /api/validate-yaml                    {"content", "repoType"}
    POST   /api/models/<ns>/<name>/preupload/<rev>   -> every file "regular"
    POST   /api/models/<ns>/<name>/commit/<rev>      ndjson: header + {"key": "file", ...} lines
    GET    /api/models/<ns>/<name>[/revision/<rev>]  model info with sha and siblings
    GET    /api/models/<ns>/<name>/tree/<rev>[/<path>]?recursive=
    POST   /api/models/<ns>/<name>/paths-info/<rev>  form or JSON {"paths": [...]}
    HEAD   /<ns>/<name>/resolve/<rev>/<path>         X-Repo-Commit, ETag, Content-Length
    GET    /<ns>/<name>/resolve/<rev>/<path>

Every repository is a real git repository under `root`, so commit shas are git's. Writes need
``Authorization: Bearer <token>``; private repositories are invisible without it. `refuse` maps a repo id
or namespace to an (HTTP status, message) answer for creating it, and `fail_commits` makes the commit
endpoint answer 500, to exercise a client's clean-up.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

NAME = re.compile(r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?")
REPO = r"(?P<repo>[^/]+/[^/]+)"
GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}


class HubError(Exception):
    """An error answer: status, JSON body {"error": message, **extra}, optional X-Error-Code header."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


@dataclass
class Repo:
    path: Path
    private: bool


class FakeHub:
    """The server and its state. Use as a context manager: ``with FakeHub(tmp_path) as hub: hub.url``."""

    def __init__(self, root: str | Path, token: str = "hf_fakehubtoken0123456789", user: str = "alice",
                 orgs: tuple[str, ...] = ("align-team",), role: str = "write"):
        self.root = Path(root)
        self.token, self.user, self.orgs, self.role = token, user, tuple(orgs), role
        self.repos: dict[str, Repo] = {}
        self.refuse: dict[str, tuple[int, str]] = {}
        self.fail_commits = False
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.lock = threading.RLock()
        self.server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self.root.mkdir(parents=True, exist_ok=True)
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ git

    def git(self, repo_id: str, *args: str, input: bytes | None = None) -> bytes:
        """Run git in a repository (tests use it to read the history)."""
        env = {**os.environ, **GIT_ENV, "GIT_AUTHOR_NAME": self.user, "GIT_AUTHOR_EMAIL": f"{self.user}@hub.test",
               "GIT_COMMITTER_NAME": "hub", "GIT_COMMITTER_EMAIL": "hub@hub.test"}
        return subprocess.run(["git", *args], cwd=self.repos[repo_id].path, input=input, env=env,
                              capture_output=True, check=True).stdout

    def commit_sha(self, repo_id: str, revision: str) -> str:
        try:
            return self.git(repo_id, "rev-parse", "--verify", "-q", f"{revision}^{{commit}}").decode().strip()
        except subprocess.CalledProcessError:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound") from None

    def entries(self, repo_id: str, sha: str, *paths: str, recursive: bool = False) -> list[dict]:
        """Tree entries as the Hub lists them: files with oid and size, folders as "directory"."""
        args = ["ls-tree", "-l", "-z", *(["-r", "-t"] if recursive else []), sha, "--", *paths]
        result = []
        for line in self.git(repo_id, *args).decode().split("\0"):
            if not line:
                continue
            meta, path = line.split("\t", 1)
            _, kind, oid, size = meta.split()
            if kind == "blob":
                result.append({"type": "file", "oid": oid, "size": int(size), "path": path})
            elif kind == "tree":
                result.append({"type": "directory", "oid": oid, "size": 0, "path": path})
        return result

    # ------------------------------------------------------------------ access

    def repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            # Like the Hub: a private repo without credentials looks like a missing one.
            raise HubError(401 if repo else 404, "Repository not found", "RepoNotFound")
        return repo

    # ------------------------------------------------------------------ endpoints

    def whoami(self, request: dict) -> dict:
        return {"type": "user", "name": self.user, "fullname": self.user.title(),
                "orgs": [{"type": "org", "name": org} for org in self.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.role}}}

    def create(self, request: dict) -> dict:
        body = request["json"]
        namespace, name = body.get("organization") or self.user, body.get("name", "")
        repo_id = f"{namespace}/{name}"
        if body.get("type", "model") != "model":
            raise HubError(400, "Only model repositories are supported here")
        if not NAME.fullmatch(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name '{name}': use letters, digits, '-', '_' and '.'")
        for key in (repo_id, namespace):
            if key in self.refuse:
                raise HubError(*self.refuse[key])
        if namespace not in (self.user, *self.orgs):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", headers={"X-Error-Code": "RepoExists"})
        path = self.root / namespace / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        self.repos[repo_id] = Repo(path, private=body.get("visibility") == "private")
        self.git(repo_id, "init", "-q", "-b", "main")
        self.git(repo_id, "commit", "-q", "--allow-empty", "-m", "initial commit")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def delete(self, request: dict) -> dict:
        body = request["json"]
        repo_id = f"{body.get('organization') or self.user}/{body.get('name')}"
        repo = self.repo(repo_id, authorized=True)
        shutil.rmtree(repo.path)
        del self.repos[repo_id]
        return {}

    def validate_yaml(self, request: dict) -> dict:
        content = request["json"].get("content", "")
        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        if match is None:
            return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            raise HubError(400, "Invalid YAML", extra={"errors": [{"message": f"YAML: {exc}"}]}) from None
        problems = [] if isinstance(metadata, dict) else ["metadata must be a mapping"]
        for key in ("tags", "datasets"):
            value = (metadata or {}).get(key) if isinstance(metadata, dict) else None
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                problems.append(f'"{key}" must be an array of strings')
        if problems:
            raise HubError(400, "Invalid metadata", extra={"errors": [{"message": p} for p in problems]})
        return {"errors": [], "warnings": []}

    def preupload(self, request: dict, repo: str, rev: str) -> dict:
        self.repo(repo, request["authorized"])
        sha = self.commit_sha(repo, rev)
        existing = {e["path"]: e["oid"] for e in self.entries(repo, sha, recursive=True) if e["type"] == "file"}
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(f["path"])}
                 for f in request["json"].get("files", [])]
        return {"files": files, "commitOid": sha}

    def commit(self, request: dict, repo: str, rev: str) -> dict:
        record = self.repo(repo, request["authorized"])
        if rev != "main":
            raise HubError(400, "Commits are only accepted on main here")
        if self.fail_commits:
            raise HubError(500, "Internal Error - the commit could not be stored")
        lines = [json.loads(line) for line in request["body"].decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        head = self.commit_sha(repo, "main")
        if header.get("parentCommit") and not head.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since the parent commit; pull and retry")
        worktree = record.path.resolve()
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            target = (worktree / value.get("path", "")).resolve()
            if worktree not in target.parents or ".git" in target.relative_to(worktree).parts:
                raise HubError(400, f"Invalid path {value.get('path')!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "Inline files must be base64-encoded")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(value["content"]))
            elif key in ("deletedFile", "deletedFolder"):
                self.git(repo, "rm", "-r", "-q", "--", str(target.relative_to(worktree)))
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}: this hub accepts inline files only")
        self.git(repo, "add", "-A")
        message = ["-m", header.get("summary") or "update", *(["-m", header["description"]]
                                                              if header.get("description") else [])]
        self.git(repo, "commit", "-q", "--allow-empty", *message)
        sha = self.commit_sha(repo, "main")
        return {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "success": True}

    def info(self, request: dict, repo: str, rev: str | None = None) -> dict:
        record = self.repo(repo, request["authorized"])
        sha = self.commit_sha(repo, rev or "main")
        files = [e["path"] for e in self.entries(repo, sha, recursive=True) if e["type"] == "file"]
        card = {}
        if "README.md" in files:
            match = re.match(r"---\n(.*?)\n---\n", self.git(repo, "show", f"{sha}:README.md").decode(), re.S)
            card = (yaml.safe_load(match.group(1)) if match else None) or {}
        stamp = int(self.git(repo, "log", "-1", "--format=%ct", sha).decode())
        modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(stamp))
        return {"_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                "private": record.private, "gated": False, "disabled": False, "lastModified": modified,
                "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
                "tags": card.get("tags", []), "cardData": card, "siblings": [{"rfilename": f} for f in files]}

    def tree(self, request: dict, repo: str, rev: str, path: str | None = None) -> list:
        self.repo(repo, request["authorized"])
        sha = self.commit_sha(repo, rev)
        recursive = request["query"].get("recursive", ["False"])[0].lower() in ("true", "1")
        if not path:
            return self.entries(repo, sha, recursive=recursive)
        entries = self.entries(repo, sha, path.rstrip("/") + "/", recursive=recursive)
        if not entries:
            raise HubError(404, f"Path {path} not found", "EntryNotFound", {"X-Repo-Commit": sha})
        return entries

    def paths_info(self, request: dict, repo: str, rev: str) -> list:
        self.repo(repo, request["authorized"])
        sha = self.commit_sha(repo, rev)
        if request["json"] is not None:
            paths = request["json"].get("paths", [])
        else:
            paths = parse_qs(request["body"].decode()).get("paths", [])
        return [entry for path in paths for entry in self.entries(repo, sha, path.rstrip("/"))]

    def resolve(self, request: dict, repo: str, rev: str, path: str) -> tuple[bytes, dict]:
        self.repo(repo, request["authorized"])
        sha = self.commit_sha(repo, rev)
        found = [e for e in self.entries(repo, sha, path) if e["type"] == "file" and e["path"] == path]
        if not found:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        content = self.git(repo, "cat-file", "blob", found[0]["oid"])
        return content, {"X-Repo-Commit": sha, "ETag": f'"{found[0]["oid"]}"',
                         "Content-Type": "application/octet-stream"}


# (method, path pattern, FakeHub method, needs a valid token)
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami", True),
    ("POST", r"/api/repos/create", "create", True),
    ("DELETE", r"/api/repos/delete", "delete", True),
    ("POST", r"/api/validate-yaml", "validate_yaml", False),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload", True),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit", True),
    ("GET", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?", "info", False),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree", False),
    ("POST", rf"/api/models/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info", False),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", False),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve", False),
]


def route(command: str, path: str) -> tuple[str, bool, re.Match]:
    for method, pattern, name, needs_token in ROUTES:
        match = re.fullmatch(pattern, path)
        if method == command and match:
            return name, needs_token, match
    raise HubError(404, f"No such endpoint: {command} {path}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._handle()

    do_POST = do_DELETE = do_HEAD = do_PUT = do_GET

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        body = self._body()
        hub.requests.append((self.command, path))
        auth = self.headers.get("Authorization")
        authorized = auth == f"Bearer {hub.token}"
        try:
            if auth is not None and not authorized:
                raise HubError(401, "Invalid username or password.",
                               headers={"X-Error-Message": "Invalid credentials in Authorization header"})
            name, needs_token, match = route(self.command, path)
            if needs_token and not authorized:
                raise HubError(401, "You must be authenticated to do this (Authorization: Bearer <token>)")
            is_json = self.headers.get("Content-Type", "").startswith("application/json") and body
            request = {"authorized": authorized, "body": body, "query": parse_qs(url.query),
                       "json": json.loads(body) if is_json else ({} if not body else None)}
            with hub.lock:
                result = getattr(hub, name)(request, **{k: v for k, v in match.groupdict().items()})
            if name == "resolve":
                content, headers = result
                self._send(200, content, headers)
            else:
                self._send(200, json.dumps(result).encode(), {"Content-Type": "application/json"})
        except HubError as exc:
            headers, payload = dict(exc.headers), {"error": exc.message, **exc.extra}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            self._send(exc.status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers})
