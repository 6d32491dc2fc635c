"""A Hugging Face Hub-compatible HTTP server on 127.0.0.1 for tests: the real ``huggingface_hub`` client uploads to it
and downloads from it (no package provides an upload-capable Hub; see environment.md).

Only what ``huggingface_hub`` 2.4 calls for sslhub's pushes and downloads is implemented, with the real Hub's status
codes and ``X-Error-Code`` headers (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``):

- ``POST /api/repos/create`` (409 when the repo exists; the client's ``exist_ok`` accepts it)
- ``POST /api/validate-yaml`` (README metadata, see :func:`metadata_errors`)
- ``GET /api/models/{repo}[/revision/{rev}]`` (repo info: ``sha``, ``siblings``)
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``recursive``; all entries in one page)
- ``POST /api/models/{repo}/preupload/{rev}`` (``uploadMode``: "lfs" for binary or large files, else "regular"; the
  current ``oid`` so that unchanged files are skipped, as on the Hub)
- ``POST /api/models/{repo}/branch/{branch}``
- ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT /lfs/{sha256}`` (basic LFS transfer; the sha256 is checked)
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: ``header``, ``file``, ``lfsFile``, ``deletedFile``,
  ``deletedFolder``); a commit is applied all at once or not at all
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag`` for LFS files)

Storage is in memory. Tokens map to a role ("write" or "read"); private repos need a token to be read (401 without
one, as on the Hub), gated repos answer 401 ``GatedRepo`` without one, writes need a "write" token (401 / 403).
Revisions are branch names or commit ids (full or a prefix of at least 7 characters). The client must not use xet
(``HF_HUB_DISABLE_XET=1``): LFS files go through the LFS batch API. Requests are recorded as ``(method, route)`` in
``requests`` (never with their headers); ``fail_next(route, status)`` makes the next call of a route fail.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

WRITE_TOKEN = "hf_loopback_write_token_0123456789"
READ_TOKEN = "hf_loopback_read_token_0123456789"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files from 10 MB in LFS, and binary files of any size
STRING_LIST_FIELDS = ("tags", "datasets", "metrics", "language")
STRING_FIELDS = ("library_name", "pipeline_tag", "license", "model_name", "base_model")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [  # (method, route name, path regex); the first match wins
    ("POST", "create", r"/api/repos/create"),
    ("POST", "validate-yaml", r"/api/validate-yaml"),
    ("POST", "preupload", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"),
    ("POST", "commit", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"),
    ("POST", "create-branch", rf"/api/models/{REPO}/branch/(?P<rev>[^/]+)"),
    ("POST", "lfs-batch", rf"/{REPO}\.git/info/lfs/objects/batch"),
    ("PUT", "lfs-upload", r"/lfs/(?P<oid>[0-9a-f]{64})"),
    ("GET", "tree", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
    ("GET", "info", rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"),
    ("HEAD", "resolve", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
    ("GET", "resolve", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"),
]


class HubHTTPError(Exception):
    """An error answer: status, ``X-Error-Code`` and message."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


def client_constants() -> dict:
    """``huggingface_hub.constants`` as the library computes them at import, from the current environment."""
    spec = importlib.util.find_spec("huggingface_hub.constants")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return {name: value for name, value in vars(fresh).items() if name.isupper()}


def git_blob_id(content: bytes) -> str:
    """The git object id of a file, as the Hub reports it (``oid`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(sample: bytes, size: int) -> bool:
    """Binary (a NUL byte in the first 512 bytes) or large files go to LFS."""
    return b"\0" in sample[:512] or size >= LFS_THRESHOLD


def local_oid(content: bytes) -> str:
    """What the client compares with ``preupload``'s ``oid``: sha256 for LFS files, the git blob id otherwise."""
    return hashlib.sha256(content).hexdigest() if is_lfs(content, len(content)) else git_blob_id(content)


def metadata_errors(content: str) -> list[str]:
    """What the Hub's ``validate-yaml`` would reject in a model card's metadata, checked with huggingface_hub itself.

    The Hub validates the YAML front matter server-side against its schema. Here a card passes when (1) the front
    matter is a YAML mapping, (2) ``huggingface_hub.ModelCard`` parses it without ``ignore_metadata_errors`` (which
    runs ``model_index_to_eval_results`` on ``model-index``), (3) every ``model-index`` result converts back with
    ``model_index_to_eval_results`` and has numeric metric values, and (4) the fields sslhub writes have the schema's
    types (strings; lists of strings). These are the checks a client can reproduce without the Hub's private schema.
    """
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if match is None:
        return []
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"invalid YAML: {err}"]
    if not isinstance(metadata, dict):
        return ["the metadata must be a YAML mapping"]
    errors = [f'"{key}" must be a string' for key in STRING_FIELDS if not isinstance(metadata.get(key, ""), str)]
    for key in STRING_LIST_FIELDS:
        value = metadata.get(key, [])
        if not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            errors.append(f'"{key}" must be a list of strings')
    try:
        ModelCard(content)
        if "model-index" in metadata:
            _, results = model_index_to_eval_results(metadata["model-index"])
            errors += [f'"{r.metric_name}": the metric value must be a number' for r in results if not _number(r)]
    except (KeyError, TypeError, ValueError) as err:
        errors.append(f'"model-index" is invalid: {err!r}')
    return errors


def _number(result) -> bool:
    return isinstance(result.metric_value, int | float) and not isinstance(result.metric_value, bool)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool = False
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch, a commit id or a prefix of one (7+ characters)."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        found = [c for oid, c in self.commits.items() if len(revision) >= 7 and oid.startswith(revision)]
        if len(found) != 1:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return found[0]


class HubServer:
    """The server and its repos; ``with HubServer() as hub: hub.url`` serves on a free loopback port in a thread."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = tokens if tokens is not None else {WRITE_TOKEN: "write", READ_TOKEN: "read"}
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.requests: list[tuple[str, str]] = []
        self.failures: dict[str, int] = {}
        self.url = ""
        self._lock = threading.Lock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None

    def __enter__(self) -> HubServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- test helpers -------------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False, gated: bool = False) -> str:
        """Create ``repo_id`` with ``files`` (and ``.gitattributes``, as the Hub does) in one commit on main; returns
        the commit id."""
        self.repos[repo_id] = Repo(private=private, gated=gated)
        return self.commit_files(repo_id, "main", "initial commit", {".gitattributes": GITATTRIBUTES, **files})

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].resolve(revision).files)

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The history of ``branch``, newest first."""
        repo, history = self.repos[repo_id], []
        oid = repo.branches[branch]
        while oid is not None:
            history.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return history

    def fail_next(self, route: str, status: int = 500) -> None:
        """The next request to ``route`` (a route name of ``ROUTES``) answers ``status``."""
        self.failures[route] = status

    def commit_files(self, repo_id: str, branch: str, message: str, added: dict[str, bytes], deleted=()) -> str:
        """One commit on ``branch``: ``deleted`` paths (files or folders) removed, ``added`` files written; all or
        nothing. Returns the commit id."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch)
            files = dict(repo.commits[parent].files) if parent else {}
            for path in deleted:
                matches = [p for p in files if p == path.rstrip("/") or p.startswith(path.rstrip("/") + "/")]
                if not matches:
                    raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for match in matches:
                    del files[match]
            files.update(added)
            self._counter += 1
            oid = hashlib.sha1(f"{repo_id}\0{parent}\0{message}\0{self._counter}".encode()).hexdigest()
            repo.commits[oid] = Commit(oid, parent, message, files)
            repo.branches[branch] = oid
            return oid


class _Handler(BaseHTTPRequestHandler):
    server_version = "sslhub-test-hub/1.0"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        """Quiet: the tests read ``HubServer.requests``."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ---- plumbing -----------------------------------------------------------------------------------------------
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        for route_method, name, pattern in ROUTES:
            match = re.fullmatch(pattern, parts.path)
            if route_method == method and match:
                self.hub.requests.append((method, name))
                try:
                    if name in self.hub.failures:
                        raise HubHTTPError(self.hub.failures.pop(name), f"injected failure of {name}")
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    getattr(self, "_" + name.replace("-", "_"))(method=method, **params)
                except HubHTTPError as err:
                    self._error(err)
                return
        self.hub.requests.append((method, parts.path))
        self._error(HubHTTPError(404, "Not Found"))

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _json_body(self):
        return json.loads(self._body() or b"{}")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {}), "Content-Length": str(len(body))}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, err: HubHTTPError) -> None:
        headers = {"X-Error-Message": err.message} | ({"X-Error-Code": err.code} if err.code else {})
        body = json.dumps({"error": err.message, **err.extra}).encode()
        self._send(err.status, body, headers, head=self.command == "HEAD")

    # ---- access -------------------------------------------------------------------------------------------------
    def _role(self) -> str | None:
        """The role of the request's bearer token; ``None`` without one; 401 for a token the server does not know."""
        authorization = self.headers.get("Authorization")
        if authorization is None:
            return None
        role = self.hub.tokens.get(authorization.removeprefix("Bearer ").strip())
        if role is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return role

    def _require_write(self) -> None:
        role = self._role()
        if role is None:
            raise HubHTTPError(401, "You must be authenticated to write to the Hub")
        if role != "write":
            raise HubHTTPError(403, "You don't have the rights to write with this token (read-only)")

    def _readable(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        anonymous = self._role() is None
        if anonymous and repo.gated:
            raise HubHTTPError(401, f"Access to model {repo_id} is restricted: you must be authenticated", "GatedRepo")
        if anonymous and repo.private:
            raise HubHTTPError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str) -> Repo:
        self._require_write()
        return self._readable(repo_id)

    def _branch(self, repo: Repo, revision: str) -> str:
        if revision not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return revision

    # ---- routes -------------------------------------------------------------------------------------------------
    def _create(self, method: str) -> None:
        self._require_write()
        body = self._json_body()
        repo_id = f"{body.get('organization') or 'me'}/{body['name']}"
        if repo_id in self.hub.repos:
            raise HubHTTPError(409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
        self.hub.add_repo(repo_id, {}, private=body.get("visibility") == "private")
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, method: str) -> None:
        content = self._json_body().get("content", "")
        errors = metadata_errors(content)
        if errors:
            self._json({"errors": [{"message": error} for error in errors]}, status=400)
        elif not content.startswith("---"):
            self._json({"warnings": [{"message": "empty or missing yaml metadata in repo card"}]})
        else:
            self._json({"warnings": []})

    def _info(self, method: str, repo: str, rev: str = "main") -> None:
        record = self._readable(repo)
        commit = record.resolve(rev)
        now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self._json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "sha": commit.oid,
                "private": record.private,
                "gated": "auto" if record.gated else False,
                "disabled": False,
                "lastModified": now,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _tree(self, method: str, repo: str, rev: str, path: str = "") -> None:
        commit = self._readable(repo).resolve(rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubHTTPError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries, folders = [], set()
        for file_path, content in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append(_file_entry(file_path, content))
        folder_entries = [{"type": "directory", "oid": git_blob_id(f.encode()), "size": 0, "path": f} for f in folders]
        self._json(sorted(folder_entries, key=lambda e: e["path"]) + entries)

    def _preupload(self, method: str, repo: str, rev: str) -> None:
        record = self._writable(repo)
        current = record.commits[record.branches[self._branch(record, rev)]].files
        files = []
        for item in self._json_body()["files"]:
            sample, path = base64.b64decode(item["sample"]), item["path"]
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs(sample, item["size"]) else "regular",
                    "shouldIgnore": False,
                    "oid": local_oid(current[path]) if path in current else None,
                }
            )
        self._json({"files": files, "commitOid": record.branches[rev]})

    def _create_branch(self, method: str, repo: str, rev: str) -> None:
        record = self._writable(repo)
        if rev in record.branches:
            raise HubHTTPError(409, f"Reference already exists: {rev}")
        start = self._json_body().get("startingPoint") or "main"
        record.branches[rev] = record.resolve(start).oid
        self._json({})

    def _lfs_batch(self, method: str, repo: str) -> None:
        self._writable(repo)
        objects = []
        for item in self._json_body()["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.hub.blobs:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs/{item['oid']}"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, method: str, oid: str) -> None:
        content = self._body()
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubHTTPError(400, "The uploaded content does not match its sha256")
        self.hub.blobs[oid] = content
        self._send(200)

    def _commit(self, method: str, repo: str, rev: str) -> None:
        record = self._writable(repo)
        branch = self._branch(record, rev)
        message, added, deleted = "", {}, []
        for line in self._body().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.blobs:
                    raise HubHTTPError(422, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                added[value["path"]] = self.hub.blobs[value["oid"]]
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise HubHTTPError(400, f"Unsupported commit operation {key!r}")
        oid = self.hub.commit_files(repo, branch, message, added, deleted)
        self._json({"success": True, "commitOid": oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}"})

    def _resolve(self, method: str, repo: str, rev: str, path: str) -> None:
        commit = self._readable(repo).resolve(rev)
        if path not in commit.files:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound")
        content = commit.files[path]
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": commit.oid}
        if is_lfs(content, len(content)):
            sha256 = hashlib.sha256(content).hexdigest()
            headers |= {"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(content))}
        else:
            headers["ETag"] = f'"{git_blob_id(content)}"'
        self._send(200, content, headers, head=method == "HEAD")


def _file_entry(path: str, content: bytes) -> dict:
    entry = {"type": "file", "oid": git_blob_id(content), "size": len(content), "path": path}
    if is_lfs(content, len(content)):
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
    return entry
