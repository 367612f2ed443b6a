"""Turn `org/name@rev` into a commit, a snapshot and blob records in the index.

This is the metadata half of a fill: after it, the tree can be listed with
exact sizes while not one byte of content has been fetched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass

from .groupcommit import GroupCommit
from .index import BlobRecord, Index
from .index.keys import folder_room
from .index.records import KINDS
from .layout import (
    COMMIT_RE,
    MAX_FILES,
    RepoSpec,
    snapshot_blocks,
    validate_blob_id,
    validate_relpath,
    validate_size,
)
from .upstream import NotFound, RemoteFile, Resolved, Resolver, UpstreamError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepoRef:
    repo_type: str
    repo_id: str
    revision: str
    commit: str

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision} ({self.commit[:12]})"


_BATCH = 10_000  # files per step of a registration: the loop serves FUSE in between


class Commits:
    """The last writes of concurrent resolutions, committed together off the loop.

    Each commit syncs the index (1-15 ms on this VM), and a start resolving 1,000 small repos
    four at a time waited for every one in turn, on the loop. Here the writes that arrive while
    one commit runs go into the next (groupcommit), in a thread; each is a child transaction, so
    one that fails is undone alone and its caller hears why. `close` before the index closes.
    """

    def __init__(self, index: Index):
        self.index = index
        self._group: GroupCommit[tuple[Callable[[object], None], list[Exception]]] = GroupCommit(self._commit)
        self._closed = False

    async def __call__(self, write: Callable[[object], None]) -> None:
        if self._closed:  # a thread must never write while the index closes
            raise UpstreamError("stopping: nothing more is recorded")
        failed: list[Exception] = []
        await self._group((write, failed))
        if failed:
            raise failed[0]

    async def close(self) -> None:
        """Refuse new writes, and return once the commit under way (in its thread) is done."""
        self._closed = True
        await self._group.settled()

    def _commit(self, writes: list[tuple[Callable[[object], None], list[Exception]]]) -> None:
        with self.index.db.write() as txn:
            for write, failed in writes:
                try:
                    with self.index.env.begin(write=True, parent=txn) as child:
                        write(child)
                except Exception as e:  # undone alone; the others still commit
                    failed.append(e)


async def _write(index: Index, commits: Commits | None, write: Callable[[object], None]) -> None:
    """One transaction: grouped with other resolutions' (`commits`), or alone on the loop."""
    if commits is not None:
        await commits(write)
        return
    with index.db.write() as txn:
        write(txn)


async def register(
    index: Index,
    chunk_size: int,
    repo_type: str,
    repo_id: str,
    revision: str,
    res: Resolved,
    on_new: Callable[[list[RemoteFile]], None] = lambda files: None,
    commits: Commits | None = None,
) -> list[RemoteFile]:
    """Record a resolved snapshot: its file list, its ref, and a record per new blob.
    `on_new` hears its files before the snapshot is written (what it records must never be
    missing for a recorded snapshot, even after a crash).

    Whatever a source listed is checked here, the one door into the index:
    bounded counts and sizes, names that can become paths, one entry per path.
    Nothing is recorded before all of it passed; the records are then written
    a batch (one transaction) at a time, the loop free between batches, the last
    batch in the transaction that writes the snapshot and its ref.
    """
    marks = [time.perf_counter()]  # where a first resolution's time goes: logged, read by bench/scale.py
    try:
        files = await _listed(res)
        marks.append(time.perf_counter())
        await check_snapshot(res.commit, files, folder_room(repo_type, repo_id))
    except ValueError as e:  # InvalidName too
        raise UpstreamError(f"{repo_type} {repo_id}@{revision}: {e}") from None
    marks.append(time.perf_counter())
    template = BlobRecord("0" * 40, 0, "gitsha1", chunk_size, repo_type=repo_type, repo_id=repo_id,
                          commit=res.commit, path="-")  # fmt: skip
    ordered = _first_per_blob(files)
    batches = [ordered[start : start + _BATCH] for start in range(0, len(ordered), _BATCH)] or [[]]
    for batch in batches[:-1]:
        index.blobs.add_listed(template, _rows(batch))
        await asyncio.sleep(0)
    on_new(files)
    marks.append(time.perf_counter())
    entries = [f.entry for f in files]
    if len(entries) > _BATCH:  # ~3 s of CPU per 10^6 files: not on the loop
        blocks = await asyncio.to_thread(snapshot_blocks, entries, True)
    else:
        blocks = snapshot_blocks(entries, checked=True)
    marks.append(time.perf_counter())

    # The last records, the snapshot, the repo's visibility and its ref: one transaction (a
    # commit syncs the index), not four; with 1,000 small repos those were most of a start's time.
    def write(txn) -> None:
        index.blobs.add_listed_in(txn, template, _rows(batches[-1]))
        index.snapshots.put_in(txn, repo_type, repo_id, res.commit, entries, blocks)
        index.repo_meta.put_in(txn, repo_type, repo_id, res.visibility)
        if revision != res.commit:  # huggingface_hub writes no ref for a commit revision
            index.refs.put_in(txn, repo_type, repo_id, revision, res.commit)

    await _write(index, commits, write)
    marks.append(time.perf_counter())
    steps = ("list", "check", "records", "blocks", "snapshot")
    log.info(
        "registered %s %s@%s: files=%d %s",
        repo_type, repo_id, revision, len(files),
        " ".join(f"{step}_s={b - a:.3f}" for step, a, b in zip(steps, marks[:-1], marks[1:], strict=True)),
    )  # fmt: skip
    return files


def _first_per_blob(files: list[RemoteFile]) -> list[RemoteFile]:
    """The first file listing each blob (it names the blob's record), in blob id order: batch
    after batch then writes its own run of the records' pages. In listing order, each of the
    hundred batches of 10^6 random ids rewrote most of the table's pages (and synced them)."""
    out: list[RemoteFile] = []
    last = None
    for f in sorted(files, key=_blob_id):  # stable: the first file of a blob stays first
        if f.entry.blob_id != last:
            out.append(f)
            last = f.entry.blob_id
    return out


def _rows(files: list[RemoteFile]) -> Iterator[tuple[str, int, str, str]]:
    return ((f.entry.blob_id, f.entry.size, f.kind, f.entry.path) for f in files)


def _blob_id(f: RemoteFile) -> str:
    return f.entry.blob_id


async def _listed(res: Resolved) -> list[RemoteFile]:
    """The snapshot's files: given, or read page by page (bounded as they come)."""
    if res.pages is None:
        return res.files
    files: list[RemoteFile] = []
    async with aclosing(res.pages()) as pages:  # a page asked ahead is cancelled, not left running
        async for page in pages:
            files.extend(page)
            if len(files) > MAX_FILES:
                raise ValueError(f"more than {MAX_FILES} files")
    return files


async def check_snapshot(commit: str, files: list[RemoteFile], room: int) -> None:
    """Refuse (ValueError) what the index cannot hold as it was listed: `room`, the bytes a
    folder's path may take in its block's key (index.keys.folder_room)."""
    if not COMMIT_RE.fullmatch(commit):
        raise ValueError(f"commit {commit!r}")
    if len(files) > MAX_FILES:
        raise ValueError(f"{len(files)} files, more than {MAX_FILES}")
    seen: set[str] = set()
    for i, f in enumerate(files):
        validate_relpath(f.entry.path)
        validate_size(f.entry.size)
        validate_blob_id(f.entry.blob_id)
        if f.kind not in KINDS:
            raise ValueError(f"{f.entry.path!r}: hash kind {f.kind!r}")
        if len(f.entry.path) * 4 > room and len(f.entry.path.rpartition("/")[0].encode()) > room:  # 4: UTF-8
            raise ValueError(f"{f.entry.path[:100]!r}…: a folder path longer than {room} bytes")
        if f.entry.path in seen:
            raise ValueError(f"{f.entry.path!r} listed twice")
        seen.add(f.entry.path)
        if i % _BATCH == _BATCH - 1:
            await asyncio.sleep(0)


async def ensure_repo(
    index: Index,
    upstream: Resolver,
    chunk_size: int,
    spec: RepoSpec,
    accept: Callable[[Resolved], str] | None = None,
    on_new: Callable[[list[RemoteFile]], None] = lambda files: None,
    commits: Commits | None = None,
) -> RepoRef:
    """Resolve upstream; if upstream is unreachable, fall back to what the index knows.

    `accept` may refuse a resolution before anything is recorded: it returns
    "" to accept or the reason to refuse (raised as NotFound). `on_new` hears
    the files of a snapshot new to the index (no second read of its list).
    `commits` groups the last transaction with other resolutions' (else it is
    committed alone, on the loop).
    """
    repo_type, repo_id, revision = spec.repo_type, spec.repo_id, spec.rev
    try:
        res = await upstream.resolve(repo_type, repo_id, revision)
        refused = accept(res) if accept else ""
        if refused:
            raise NotFound(f"{repo_type} {repo_id}: {refused}")
    except NotFound:
        raise
    except UpstreamError as e:
        commit = index.refs.commit_of(repo_type, repo_id, revision)
        if commit and commit in index.snapshots.commits(repo_type, repo_id):  # keys only: no file list read
            log.warning("cannot resolve upstream (%s); serving %s@%s from the index", e, repo_id, revision)
            return RepoRef(repo_type, repo_id, revision, commit)
        raise
    if res.commit in index.snapshots.commits(repo_type, repo_id):
        # A commit never changes: its snapshot and blob records are in the index already.
        # Re-resolving a 10^6-file repo at each start or refresh must not rewrite them.

        def write(txn) -> None:  # one transaction, not two: a restart re-resolves every repo
            index.repo_meta.put_in(txn, repo_type, repo_id, res.visibility)
            if revision != res.commit:
                index.refs.put_in(txn, repo_type, repo_id, revision, res.commit)

        await _write(index, commits, write)
    else:
        await register(index, chunk_size, repo_type, repo_id, revision, res, on_new, commits)
    return RepoRef(repo_type, repo_id, revision, res.commit)
