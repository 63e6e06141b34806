"""A small in-memory stand-in for the Hugging Face Hub, for tests.

It answers the requests the real ``huggingface_hub`` client makes for ``create_repo``,
``upload_folder`` (preupload -> every file "regular", so no LFS/Xet; NDJSON commit; draft pull
requests), ``create_branch``, ``model_info``/``repo_info`` and ``hf_hub_download`` (HEAD/GET on
``/{repo}/resolve/{revision}/{filename}`` with the X-Repo-Commit, ETag and Content-Length headers the
client relies on). Point ``HF_ENDPOINT`` at :attr:`FakeHub.url`. Failures can be switched on:
:meth:`FakeHub.fail` answers a status code for the next matching requests, ``unauthorized`` answers
401 to everything. Plain files can be served from ``/files/<name>`` (release downloads).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # ref name ("main", "refs/pr/1") -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files
    pulls: list[dict[str, Any]] = field(default_factory=list)

    def files(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        commit = self.branches.get(revision, revision if revision in self.commits else None)
        return None if commit is None else (commit, self.commits[commit])


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeHub:
    """The fake Hub; use as a context manager (``with FakeHub() as hub: ...``)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.static: dict[str, bytes] = {}
        self.unauthorized = False
        self._failures: list[list[Any]] = []  # [method, path regex, status, remaining]
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        """Answer ``status`` to the next ``times`` requests whose method and path match."""
        self._failures.append([method, re.compile(path_regex), status, times])

    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        """Create (or update) a repo with one commit holding ``files``; returns the commit id."""
        repo = self.repos.setdefault(repo_id, Repo())
        return self._commit(repo, revision, dict(files))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].files(revision)[1]

    def _commit(self, repo: Repo, ref: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(str(len(repo.commits)).encode())
        for path in sorted(files):
            digest.update(path.encode() + hashlib.sha1(files[path]).digest())
        commit = digest.hexdigest()
        repo.commits[commit] = files
        repo.branches[ref] = commit
        return commit

    def _take_failure(self, method: str, path: str) -> int | None:
        with self._lock:
            for rule in self._failures:
                if rule[0] == method and rule[1].search(path) and rule[3] > 0:
                    rule[3] -= 1
                    return rule[2]
        return None


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:  # keep test output clean
            pass

        # ---------------------------------------------------------------- plumbing
        def _reply(self, status: int, body: Any = b"", headers: dict[str, str] | None = None) -> None:
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str | None = None, message: str = "error") -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._reply(status, {"error": message}, headers)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            split = urlsplit(self.path)
            path, query = split.path, parse_qs(split.query)
            hub.requests.append(Request(self.command, self.path, dict(self.headers.items()), body))
            status = hub._take_failure(self.command, path)
            if status is not None:
                return self._error(status, message=f"injected failure {status}")
            if hub.unauthorized:
                return self._error(401, message="Invalid credentials in Authorization header")
            parts = [unquote(p) for p in path.strip("/").split("/")]
            try:
                self._route(parts, query, body)
            except KeyError as err:
                self._error(404, "RepoNotFound", f"not found: {err}")

        do_GET = do_HEAD = do_POST = _handle

        # ---------------------------------------------------------------- routes
        def _route(self, parts: list[str], query: dict[str, list[str]], body: bytes) -> None:
            method = self.command
            if parts[:1] == ["files"] and method in ("GET", "HEAD"):
                data = hub.static["/".join(parts[1:])]
                return self._reply(200, data, {"Content-Type": "application/octet-stream"})
            if parts == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if parts == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                return self._model_api(repo_id, rest, query, body)
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            self._error(404, message=f"no route for {method} {self.path}")

        def _create_repo(self, payload: dict[str, Any]) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                headers = {"X-Error-Message": "You already created this model repo"}
                return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                                   headers)
            hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            hub._commit(hub.repos[repo_id], "main", {".gitattributes": b"*.safetensors filter=lfs\n"})
            self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self, payload: dict[str, Any]) -> None:
            match = re.match(r"^---\n(.*?)\n---\n", payload["content"], re.S)
            try:
                metadata = yaml.safe_load(match.group(1)) if match else None
            except yaml.YAMLError as err:
                return self._reply(400, {"errors": [{"message": str(err)}]})
            if not isinstance(metadata, dict):
                return self._reply(400, {"errors": [{"message": "no YAML metadata block"}]})
            self._reply(200, {"errors": [], "warnings": []})

        def _model_api(self, repo_id: str, rest: list[str], query: dict[str, list[str]], body: bytes) -> None:
            repo = hub.repos[repo_id]
            method = self.command
            if not rest or rest[0] == "revision":
                found = repo.files(rest[1] if rest else "main")
                if found is None:
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                commit, files = found
                siblings = [{"rfilename": name} for name in sorted(files)]
                info = {"id": repo_id, "sha": commit, "private": repo.private, "siblings": siblings, "tags": []}
                return self._reply(200, info)
            action, ref = rest[0], "/".join(rest[1:])
            if action == "preupload" and method == "POST":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": modes})
            if action == "commit" and method == "POST":
                return self._commit(repo_id, repo, ref, query, body)
            if action == "branch" and method == "POST":
                if ref in repo.branches:
                    return self._error(409, message="Reference already exists")
                repo.branches[ref] = repo.branches["main"]
                return self._reply(200, {})
            if action == "discussions" and method == "POST":
                return self._reply(200, self._open_pull(repo_id, repo, json.loads(body)["title"]))
            if action == "discussions" and method == "GET":
                pull = repo.pulls[int(ref) - 1]
                return self._reply(200, self._pull_details(repo_id, pull))
            self._error(404, message=f"no route for {method} {self.path}")

        def _open_pull(self, repo_id: str, repo: Repo, title: str) -> dict[str, Any]:
            num = len(repo.pulls) + 1
            repo.pulls.append({"num": num, "title": title})
            repo.branches[f"refs/pr/{num}"] = repo.branches["main"]
            return {"num": num, "url": f"{hub.url}/{repo_id}/discussions/{num}"}

        def _pull_details(self, repo_id: str, pull: dict[str, Any]) -> dict[str, Any]:
            return {
                "title": pull["title"], "num": pull["num"], "author": {"name": "tester"},
                "createdAt": "2024-01-01T00:00:00.000Z", "status": "draft",
                "repo": {"name": repo_id, "type": "model"}, "isPullRequest": True, "events": [],
                "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [],
            }

        def _commit(self, repo_id: str, repo: Repo, ref: str, query: dict[str, list[str]], body: bytes) -> None:
            pull_url = None
            if query.get("create_pr") == ["1"]:
                pull = self._open_pull(repo_id, repo, "commit")
                ref, pull_url = f"refs/pr/{pull['num']}", pull["url"]
            found = repo.files(ref)
            if found is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {ref}")
            files = dict(found[1])
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
                elif item["key"] != "header":
                    return self._error(422, message=f"unsupported commit operation {item['key']}")
            commit = hub._commit(repo, ref, files)
            self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{commit}", "commitOid": commit,
                              "pullRequestUrl": pull_url})

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            found = hub.repos[repo_id].files(revision)
            if found is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            commit, files = found
            if filename not in files:  # the client caches the absence per commit
                headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                           "X-Repo-Commit": commit}
                return self._reply(404, {"error": "Entry not found"}, headers)
            data = files[filename]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            self._reply(200, data, headers)

    return Handler
