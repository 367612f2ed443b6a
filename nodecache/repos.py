"""Turn `org/name@rev` into a commit, a snapshot and blob records in the index.

This is the metadata half of a fill: after it, the tree can be listed with
exact sizes while not one byte of content has been fetched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .index import BlobRecord, Index
from .layout import COMMIT_RE, parse_repo_spec
from .upstream import NotFound, Resolved, Upstream, UpstreamError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepoRef:
    repo_type: str
    repo_id: str
    revision: str
    commit: str

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision} ({self.commit[:12]})"


def register(index: Index, chunk_size: int, repo_type: str, repo_id: str, revision: str, res: Resolved) -> None:
    """Record a resolved snapshot: its file list, its ref, and a record per new blob."""
    for f in res.files:
        if index.get_blob(f.entry.blob_id) is None:
            rec = BlobRecord(
                blob_id=f.entry.blob_id,
                size=f.entry.size,
                kind=f.kind,
                chunk_size=chunk_size,
                repo_type=repo_type,
                repo_id=repo_id,
                commit=res.commit,
                path=f.entry.path,
            )
            index.put_blob(rec)
    index.put_snapshot(repo_type, repo_id, res.commit, [f.entry for f in res.files])
    index.put_repo_meta(repo_type, repo_id, res.visibility)
    if revision != res.commit:  # huggingface_hub writes no ref for a commit revision
        index.put_ref(repo_type, repo_id, revision, res.commit)


async def ensure_repo(index: Index, upstream: Upstream, chunk_size: int, spec: str) -> RepoRef:
    """Resolve upstream; if upstream is unreachable, fall back to what the index knows."""
    repo_type, repo_id, revision = parse_repo_spec(spec)
    try:
        res = await upstream.resolve(repo_type, repo_id, revision)
    except NotFound:
        raise
    except UpstreamError as e:
        commit = revision if COMMIT_RE.fullmatch(revision) else index.get_ref(repo_type, repo_id, revision)
        if commit and index.get_snapshot(repo_type, repo_id, commit) is not None:
            log.warning("upstream unreachable (%s); serving %s@%s from the index", e, repo_id, revision)
            return RepoRef(repo_type, repo_id, revision, commit)
        raise
    register(index, chunk_size, repo_type, repo_id, revision, res)
    return RepoRef(repo_type, repo_id, revision, res.commit)


def snapshot_blobs(index: Index, ref: RepoRef) -> list[str]:
    files = index.get_snapshot(ref.repo_type, ref.repo_id, ref.commit) or []
    return [f.blob_id for f in files]
