"""What a mirror request names (pure): the repo, revision and file of its path, and its byte range."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..layout import REPO_TYPES, RepoSpec, validate_relpath, validate_repo_id, validate_revision
from .errors import HubError, unsatisfiable

_TYPE_OF = {v: k for k, v in REPO_TYPES.items()}  # "models" -> "model"
_REF_KINDS = ("pr", "convert", "heads", "tags")  # unencoded refs/<kind>/<name> revisions
_RANGE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")
_API_OPS = ("revision", "tree", "paths-info")


@dataclass(frozen=True)
class Target:
    repo_type: str
    repo_id: str
    revision: str

    @property
    def api_base(self) -> str:
        return f"/api/{REPO_TYPES[self.repo_type]}/{self.repo_id}"

    @property
    def spec(self) -> RepoSpec:
        return RepoSpec(self.repo_type, self.repo_id, self.revision)

    @property
    def resolve_base(self) -> str:
        return f"/{self.spec.name}/resolve/{quote(self.revision, safe='')}"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of one byte range; None: whole file; anything else is 416."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m or not (m[1] or m[2]):
        raise unsatisfiable(size, f"unsupported Range {header[:100]!a}: expected one 'bytes=a-b'")
    if not m[1]:  # suffix: the last n bytes
        start, end = max(0, size - int(m[2])), size
    else:
        start = int(m[1])
        end = min(int(m[2]) + 1, size) if m[2] else size
        if m[2] and int(m[2]) < start:
            raise unsatisfiable(size, f"bad Range {header[:100]!a}: last byte before first")
    if start >= end:
        raise unsatisfiable(size, f"Range {header[:100]!a} not satisfiable for {size} bytes")
    return start, end


def split_revision(parts: list[str]) -> tuple[str, list[str]]:
    """First decoded segment(s) name the revision; `refs/pr/1` may come unencoded."""
    if not parts:
        raise HubError(400, "missing revision")
    if parts[0] == "refs" and len(parts) >= 3 and parts[1] in _REF_KINDS:
        return "/".join(parts[:3]), parts[3:]
    return parts[0], parts[1:]


def _segments(raw_path: str) -> list[str]:
    return [unquote(s, errors="strict") for s in raw_path.split("?", 1)[0].split("/")[1:]]


def parse_resolve_path(raw_path: str) -> tuple[Target, str]:
    """`[datasets/|spaces/]org/name/resolve/{rev}/{path}` -> (target, path), all validated."""
    segs = _segments(raw_path)
    repo_type = "model"
    if segs and segs[0] in ("datasets", "spaces"):
        repo_type, segs = _TYPE_OF[segs[0]], segs[1:]
    for i in (1, 2):
        if len(segs) > i + 2 and segs[i] == "resolve":
            break
    else:
        raise HubError(400, "expected /{repo}/resolve/{revision}/{path}")
    repo_id = validate_repo_id("/".join(segs[:i]))
    revision, rest = split_revision(segs[i + 1 :])
    return Target(repo_type, repo_id, validate_revision(revision)), validate_relpath("/".join(rest))


def parse_api_path(raw_path: str) -> tuple[str, str, str, list[str]]:
    """`/api/{type}s/{repo}[/{op}/...]` -> (repo_type, repo_id, op, rest); op "" is repo info."""
    segs = _segments(raw_path)[2:]
    repo_type = _TYPE_OF[_segments(raw_path)[1]]
    if len(segs) >= 3 and segs[2] in _API_OPS:
        n = 2
    elif len(segs) >= 2 and segs[1] in _API_OPS:
        n = 1
    elif len(segs) <= 2:
        n = len(segs)
    else:
        raise HubError(404, "unsupported API route")
    repo_id = validate_repo_id("/".join(segs[:n]))
    rest = segs[n:]
    return repo_type, repo_id, (rest[0] if rest else ""), rest[1:]
