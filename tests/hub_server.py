"""A fake Hugging Face Hub on 127.0.0.1: the few endpoints that huggingface_hub 2.x calls to push (`create_repo`,
`create_branch`, `upload_folder`, `create_commit`) and to download (`snapshot_download`, `hf_hub_download`: model
info by revision, the repo tree, HEAD/GET on resolve), with every request recorded.

Pushes: every file is answered with upload mode "regular", so the client sends contents inline in the NDJSON
commit and never needs LFS or Xet storage. Downloads: `add_commit` seeds a repo with the files of one commit (a
repo is public, private or gated; `readers` are the tokens that may read the private and gated ones); a revision
is a branch, a tag (`tag`) or a commit sha. Weights (*.safetensors, *.bin, ...) are served as LFS files (ETag
and X-Linked-Etag the sha256, X-Linked-Size), the others as git blobs (ETag the git sha1), never through Xet. A GET
with a `Range: bytes=a-b` header is answered as the Hub's storage answers it: 206 Partial Content with those bytes
and `Content-Range: bytes a-b/size` (416 when the range starts past the end; the whole file with 200 when
`ranges` is turned off, as a server without range support does); `served` records the bytes every answer
carried, so that a test can tell a header read from a download.
Failures can be injected per path (`fail(401)`, `fail(404)`, `fail("drop")` closes the connection without an
answer). Requests are bounded: bodies over `MAX_BODY` bytes are refused, sockets time out, and after
`MAX_REQUESTS` requests every answer is 400.

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
REVISION = r"(?P<revision>refs/(?:pr|convert)/[^/]+|[^/]+)"
"""A revision in a path: arrives quoted (refs%2Fpr%2F1) and is matched unquoted, so refs/... are spelled out."""
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


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
    """A repository: visibility, branches (name -> {path: bytes}, what pushes change), pull requests (titles), and
    for downloads the commits (sha -> {path: bytes}) and refs (branch or tag -> sha)."""

    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    pulls: list[str] = field(default_factory=list)
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    """A non-JSON answer: status, body (not sent for HEAD) and headers."""

    status: int
    body: bytes
    headers: dict[str, str]


class HubError(Exception):
    """An error answer: status, message, the Hub's X-Error-Code, extra headers and extra JSON fields."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


def git_blob_sha(data: bytes) -> str:
    """The git object id of a file's contents (sha1 of "blob <size>\\0" + contents)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    """Weights are stored in LFS on the Hub (their ETag is the sha256 of the contents)."""
    return path.endswith(LFS_SUFFIXES)


class FakeHub:
    """The server and its recorded state; a context manager that runs it in a thread."""

    def __init__(self, token: str | None = None, readers: set[str] | frozenset[str] = frozenset()):
        self.token = token
        self.readers = set(readers) | ({token} if token else set())
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.ranges = True
        """Whether GET answers a Range header with the range (206), else with the whole file (200)."""
        self.served: list[tuple[str, int, int]] = []
        """(repo/path, first byte, end) of the file bytes each GET on resolve answered with (end exclusive)."""
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

    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", *, private: bool = False,
                   gated: bool = False) -> str:
        """Make `files` (path -> bytes) the whole tree of `branch` of `repo_id` (created if needed) in a new commit;
        its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private, gated=gated))
            return self._record(repo_id, repo, branch, dict(files))

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        """Point the tag `name` of `repo_id` at the commit `sha`."""
        self.repos[repo_id].refs[name] = sha

    def downloads(self) -> list[str]:
        """Paths of the repo files fetched whole with GET (repo/path, no Range header), in order."""
        found = (re.fullmatch(rf"/{REPO}/resolve/{REVISION}/(?P<path>.+)", r.path) for r in self.requests
                 if r.method == "GET" and "range" not in r.headers)
        return [f"{m['repo']}/{m['path']}" for m in found if m]

    def bytes_served(self, path: str) -> int:
        """How many bytes of the repo file `path` (repo/path) GET answers carried, ranges and whole files."""
        return sum(end - start for name, start, end in self.served if name == path)

    def _record(self, repo_id: str, repo: Repo, branch: str, files: dict[str, bytes]) -> str:
        """Set `branch` to `files` in a new commit (sha from the repo, branch, count and contents)."""
        digest = hashlib.sha1(f"{repo_id}\0{branch}\0{len(repo.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha(files[path])}\n".encode())
        sha = digest.hexdigest()
        repo.commits[sha], repo.refs[branch], repo.branches[branch] = dict(files), sha, files
        return sha

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- request handling (called from server threads) -----------------------------------------

    def handle(self, request: Request) -> dict | list | Reply | None:
        """The answer to `request` (JSON, or a Reply), or None to drop the connection; raises HubError for error
        answers."""
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
        self._record(repo, self.repos[repo], branch, dict(self._branch(repo, start)))
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
        tree = self._branch(repo, revision)
        tree.update(files)
        self.commits.append(Commit(repo, revision, header["summary"], header.get("description", ""), files))
        oid = self._record(repo, self.repos[repo], revision, tree)
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


    # -- downloads ------------------------------------------------------------------------------

    def agent_harnesses(self, request: Request) -> dict:
        """huggingface_hub's user-agent registry (fetched once a day): empty."""
        return {"standardEnvVars": [], "harnesses": {}}

    def _readable(self, request: Request, repo_id: str, files: bool = False) -> Repo:
        """The repo, when the request's token may read it (private: a reader; gated: a reader for its files)."""
        repo = self._repo(repo_id)
        token = request.headers.get("authorization", "").removeprefix("Bearer ") or None
        if token in self.readers:
            return repo
        if repo.private:
            raise HubError(401 if token is None else 404, f"Repository {repo_id} not found", "RepoNotFound")
        if repo.gated and files:
            raise HubError(401 if token is None else 403, f"Access to model {repo_id} is restricted and you are not "
                           "in the authorized list. Visit the repo page to ask for access.", "GatedRepo")
        return repo

    def _commit(self, repo_id: str, repo: Repo, revision: str) -> str:
        """The commit sha that `revision` (branch, tag or sha) names."""
        sha = repo.refs.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def model_info(self, request: Request, repo: str, revision: str = "main") -> dict:
        entry = self._readable(request, repo)
        sha = self._commit(repo, entry, revision)
        return {"id": repo, "modelId": repo, "sha": sha, "private": entry.private,
                "gated": "manual" if entry.gated else False,
                "siblings": [{"rfilename": path} for path in sorted(entry.commits[sha])]}

    def tree(self, request: Request, repo: str, revision: str, folder: str | None = None) -> list:
        entry = self._readable(request, repo)
        files = entry.commits[self._commit(repo, entry, revision)]
        prefix = f"{folder.strip('/')}/" if folder else ""
        recursive = request.query.get("recursive", ["False"])[0].lower() == "true"
        listed: dict[str, dict] = {}
        for path in sorted(p for p in files if p.startswith(prefix)):
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                name = prefix + "/".join(parts[:depth])
                listed.setdefault(name, {"type": "directory", "path": name, "oid": git_blob_sha(name.encode())})
            if recursive or len(parts) == 1:
                listed[path] = self._file_entry(path, files[path])
        return list(listed.values())

    @staticmethod
    def _file_entry(path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
        if is_lfs(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def resolve(self, request: Request, repo: str, revision: str, path: str) -> Reply:
        entry = self._readable(request, repo, files=True)
        sha = self._commit(repo, entry, revision)
        files = entry.commits[sha]
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": sha})
        data = files[path]
        headers = {"X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}
        if is_lfs(path):
            digest = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{digest}"', "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_sha(data)}"'
        start, end = 0, len(data)
        wanted = request.headers.get("range") if request.method == "GET" and self.ranges else None
        if wanted is not None:
            span = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
            if span is None or int(span[1]) >= len(data):
                raise HubError(416, f"Range not satisfiable: {wanted}",
                               headers={"Content-Range": f"bytes */{len(data)}"})
            start, end = int(span[1]), min(len(data), int(span[2]) + 1 if span[2] else len(data))
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if request.method == "GET":
            self.served.append((f"{repo}/{path}", start, end))
        return Reply(206 if wanted is not None else 200, data[start:end], headers)


ROUTES = [
    ("POST", r"/api/repos/create", FakeHub.create_repo),
    ("POST", r"/api/validate-yaml", FakeHub.validate_yaml),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", FakeHub.create_branch),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>.+)", FakeHub.preupload),
    ("POST", rf"/api/models/{REPO}/commit/(?P<revision>.+)", FakeHub.commit),
    ("POST", rf"/api/models/{REPO}/discussions", FakeHub.open_pull),
    ("GET", rf"/api/models/{REPO}/discussions/(?P<num>\d+)", FakeHub.pull_details),
    ("GET", r"/api/agent-harnesses", FakeHub.agent_harnesses),
    ("GET", rf"/api/models/{REPO}", FakeHub.model_info),
    ("GET", rf"/api/models/{REPO}/revision/(?P<revision>.+)", FakeHub.model_info),
    ("GET", rf"/api/models/{REPO}/tree/{REVISION}(?:/(?P<folder>.+))?", FakeHub.tree),
    ("HEAD", rf"/{REPO}/resolve/{REVISION}/(?P<path>.+)", FakeHub.resolve),
    ("GET", rf"/{REPO}/resolve/{REVISION}/(?P<path>.+)", FakeHub.resolve),
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

        def do_HEAD(self) -> None:  # noqa: N802
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
                return self._answer(exc.status, {"error": exc.message, **exc.extra}, exc.code, exc.headers)
            if answer is None:
                self.close_connection = True
                return None
            if isinstance(answer, Reply):
                return self._send(answer)
            return self._answer(200, answer)

        def _answer(self, status: int, payload: dict | list, code: str | None = None,
                    headers: dict[str, str] | None = None) -> None:
            extra = {"X-Error-Code": code, "X-Error-Message": payload["error"]} if code else {}
            self._send(Reply(status, json.dumps(payload).encode(),
                             {"Content-Type": "application/json", **extra, **(headers or {})}))

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            for name, value in {**reply.headers, "Content-Length": str(len(reply.body))}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            """Quiet: the requests are recorded on the hub instead."""

    return Handler
