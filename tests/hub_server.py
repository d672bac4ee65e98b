"""A fake Hugging Face Hub on 127.0.0.1 for push tests: the few endpoints that `create_repo`, `create_branch`,
`upload_folder` and `create_commit` of huggingface_hub 2.x call, with every request recorded.

Every file is answered with upload mode "regular", so the client sends contents inline in the NDJSON
commit and never needs LFS or Xet storage. Failures can be injected per path (`fail(401)`, `fail(404)`,
`fail("drop")` closes the connection without an answer). Requests are bounded: bodies over
`MAX_BODY` bytes are refused, sockets time out, and after `MAX_REQUESTS` requests every answer is 400.

    with FakeHub(token="hf_x") as hub:
        HfApi(endpoint=hub.url, token="hf_x").create_repo("org/name")
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

import yaml

MAX_BODY = 16 * 2**20
MAX_REQUESTS = 200
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Request:
    """One request as it arrived: method, unquoted path, query, lower-cased headers, body."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    """One commit the fake Hub accepted."""

    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes]


@dataclass
class Repo:
    """A repository: visibility, branches (name -> {path: bytes}) and pull requests (titles)."""

    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    pulls: list[str] = field(default_factory=list)


class HubError(Exception):
    """An error answer: status, message and the Hub's X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """The server and its recorded state; a context manager that runs it in a thread."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self._failures: list[tuple[str, int | str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port> (no trailing slash), the value for HF_ENDPOINT."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, status: int | str, when: str = "") -> None:
        """Answer every request whose path contains `when` with `status` (401, 404, ...) or "drop" the connection."""
        self._failures.append((when, status))

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- request handling (called from server threads) -----------------------------------------

    def handle(self, request: Request) -> dict | None:
        """The JSON answer to `request`, or None to drop the connection; raises HubError for error answers."""
        with self._lock:
            self.requests.append(request)
            if len(self.requests) > MAX_REQUESTS:
                raise HubError(400, "too many requests for a test")
            for when, status in self._failures:
                if when in request.path:
                    if status == "drop":
                        return None
                    raise HubError(status, f"injected {status}", {404: "RepoNotFound"}.get(status))
            if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
                raise HubError(401, "Invalid credentials in Authorization header")
            for method, pattern, action in ROUTES:
                match = re.fullmatch(pattern, request.path)
                if match and method == request.method:
                    return action(self, request, **match.groupdict())
            self.unhandled.append(f"{request.method} {request.path}")
            raise HubError(404, f"the fake Hub has no endpoint {request.method} {request.path}")

    def _repo(self, repo: str) -> Repo:
        if repo not in self.repos:
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return self.repos[repo]

    def _branch(self, repo: str, revision: str) -> dict[str, bytes]:
        branches = self._repo(repo).branches
        if revision not in branches:
            raise HubError(404, f"Revision {revision} not found", "RevisionNotFound")
        return branches[revision]

    def create_repo(self, request: Request) -> dict:
        payload = json.loads(request.body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, request: Request) -> dict:
        content = json.loads(request.body)["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            raise HubError(400, f"invalid YAML: {exc}") from None
        if not isinstance(meta, dict):
            raise HubError(400, "the metadata is not a mapping")
        return {"errors": [], "warnings": []}

    def create_branch(self, request: Request, repo: str, branch: str) -> dict:
        branches = self._repo(repo).branches
        if branch in branches:
            raise HubError(409, f"branch {branch} already exists")
        start = json.loads(request.body or b"{}").get("startingPoint", "main")
        branches[branch] = dict(self._branch(repo, start))
        return {}

    def preupload(self, request: Request, repo: str, revision: str) -> dict:
        if "create_pr" not in request.query:
            self._branch(repo, revision)
        files = json.loads(request.body)["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def commit(self, request: Request, repo: str, revision: str) -> dict:
        if request.headers.get("content-type") != "application/x-ndjson":
            raise HubError(400, "a commit is NDJSON")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {}
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                raise HubError(400, f"the fake Hub takes regular files only, not {line['key']}")
        self._branch(repo, revision).update(files)
        self.commits.append(Commit(repo, revision, header["summary"], header.get("description", ""), files))
        oid = hashlib.sha1(f"{len(self.commits)}".encode()).hexdigest()
        pull = f"{self.url}/{repo}/discussions/{revision.rsplit('/', 1)[1]}" if revision.startswith("refs/pr/") else None
        return {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pull}

    def open_pull(self, request: Request, repo: str) -> dict:
        entry = self._repo(repo)
        entry.pulls.append(json.loads(request.body)["title"])
        num = len(entry.pulls)
        entry.branches[f"refs/pr/{num}"] = dict(entry.branches["main"])
        return {"num": num, "url": f"{self.url}/{repo}/discussions/{num}"}

    def pull_details(self, request: Request, repo: str, num: str) -> dict:
        entry = self._repo(repo)
        return {
            "num": int(num), "title": entry.pulls[int(num) - 1], "author": {"name": "tester"},
            "createdAt": "2026-01-01T00:00:00.000Z", "status": "draft", "repo": {"name": repo, "type": "model"},
            "isPullRequest": True, "events": [], "changes": {"base": "refs/heads/main"}, "filesWithConflicts": [],
        }


ROUTES = [
    ("POST", r"/api/repos/create", FakeHub.create_repo),
    ("POST", r"/api/validate-yaml", FakeHub.validate_yaml),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", FakeHub.create_branch),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>.+)", FakeHub.preupload),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>.+)", FakeHub.commit),
    ("POST", rf"/api/models/{REPO}/discussions", FakeHub.open_pull),
    ("GET", rf"/api/models/{REPO}/discussions/(?P<num>\d+)", FakeHub.pull_details),
]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `hub`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10

        def do_GET(self) -> None:  # noqa: N802
            self._serve()

        def do_POST(self) -> None:  # noqa: N802
            self._serve()

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY or "chunked" in self.headers.get("Transfer-Encoding", ""):
                self.close_connection = True
                return self._answer(413, {"error": "request body too large or not sized"})
            body = self.rfile.read(length)
            split = urlsplit(self.path)
            # Revisions arrive quoted (refs%2Fpr%2F1); the routes match the unquoted path.
            request = Request(self.command, unquote(split.path), parse_qs(split.query),
                              {k.lower(): v for k, v in self.headers.items()}, body)
            try:
                answer = hub.handle(request)
            except HubError as exc:
                return self._answer(exc.status, {"error": exc.message, **exc.extra}, exc.code)
            if answer is None:
                self.close_connection = True
                return None
            return self._answer(200, answer)

        def _answer(self, status: int, payload: dict, code: str | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            """Quiet: the requests are recorded on the hub instead."""

    return Handler
