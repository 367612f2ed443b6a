"""Snapshot-aware fill: a reader opened a weight file, so fill the rest of the snapshot it will read.

What and in which order is snapplan's (pure); here the whole-blob fills are
started: the opened shard, which is being read, with a worker per fetch
slot (parallel_total: a reader's own request takes back the readers' reserve,
slots.py), the small files beside it, then the other shards one after another
with as many, each started once every chunk of the one before is claimed. So the shard the loader reads next is complete first, and its open
is passthrough; shards filling side by side would finish together, late, and
every one of them be served by the daemon. Every such fetch is a background
one: readers' chunks go ahead (slots.py).

A loader reads a model's config.json seconds before the weights: its open
starts the weight file the loader opens first (one such fill at a time).

Complete shards the loader reads next are read into the page cache ahead of
it (`shard_read_ahead` bytes past the newest shard opened): whole-blob fills
write around it, and a cold passthrough read waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import accumulate

from .chunks import consume
from .config import Config
from .expiring import ExpiringSet
from .index import BlobRecord, Index
from .layout import FileEntry
from .snapplan import first_weight, index_files, is_weight, locate, read_ahead, siblings, small_files

log = logging.getLogger(__name__)

Snapshot = tuple[str, str, str]  # (repo type, repo id, commit)
_REPLAN_AFTER = 60.0  # a snapshot planned lately is not planned again on every open of a shard
_PLANNED_MAX = 1024
CONFIG = "config.json"  # read by a loader first: its open starts the first weight file (_config_opened)


@dataclass
class _Order:
    """The weight file that planned a snapshot and those after it in loader order (not the
    ones before it: read already), the newest one a reader opened (`reading`, a position),
    and how far the read-ahead window has looked (each file is looked at once, as it comes
    into the window; one complete later is looked at again when its fill ends)."""

    files: list[FileEntry]
    reading: int = 0  # -1: nobody reads it through this node's page cache yet (a mirror client)
    looked: int = 1  # files[1:looked] came into the window already
    warmed: set[str] = field(default_factory=set)
    ends: list[int] = field(init=False)  # ends[i]: the bytes of files[:i]
    at: dict[str, int] = field(init=False)  # blob id -> its first position

    def __post_init__(self) -> None:
        self.ends = list(accumulate((f.size for f in self.files), initial=0))
        self.at = {}
        for i, f in enumerate(self.files):
            self.at.setdefault(f.blob_id, i)


class SnapshotFills:
    """One fill per snapshot at a time, started by the first open of one of its weight files."""

    def __init__(
        self,
        cfg: Config,
        index: Index,
        start: Callable[[str, int | None], asyncio.Task | None],
        claimed: Callable[[str], Awaitable[None]],
        record: Callable[[str], BlobRecord | None],
        read: Callable[[str, int, int], Awaitable[bytes]],
        warm: Callable[[str], Awaitable[None]],
        fits: Callable[[dict[str, int]], bool] = lambda sizes: True,
    ):
        self.cfg, self.index = cfg, index
        # Could these blobs (id -> bytes) be whole in the cache at once, as a prefetch's? If not, the
        # shards ahead of the loader are not filled: they would evict those it has not read yet.
        self.fits = fits
        # Start (or join, with at least n workers) a blob's whole-blob fill; None if complete or failing.
        self.start = start
        self.claimed = claimed  # until every chunk of a blob's running fill is claimed by a worker
        self.record, self.read = record, read
        self.warm = warm  # read a complete blob into the page cache (asynchronously)
        self.workers = cfg.parallel_total  # every slot: a reader's request takes back the readers' reserve (slots.py)
        self._tasks: dict[Snapshot, asyncio.Task] = {}
        self._planned = ExpiringSet(_REPLAN_AFTER, _PLANNED_MAX)
        self._seen = ExpiringSet(_REPLAN_AFTER, _PLANNED_MAX)  # (type, repo, blob) opened lately
        self._orders: OrderedDict[Snapshot, _Order] = OrderedDict()  # the newest _PLANNED_MAX plans
        self._warming: set[asyncio.Task] = set()
        self._early: asyncio.Task | None = None  # the fill a config.json's open started (_config_opened)

    def opened(
        self, repo_type: str, repo_id: str, blob_id: str, commit: str | None = None, reads_here: bool = True
    ) -> asyncio.Task | None:
        """A reader opened a blob of this repo (of this snapshot, if known): if it is a weight
        file, fill what the loader reads next (fill_snapshot_on_open). `reads_here`: the
        reader reads through this node's page cache (the mount), so the shards after it are
        read into it ahead (shard_read_ahead); a mirror client keeps its own copy."""
        if (
            not (self.cfg.fill_on_open and self.cfg.fill_snapshot_on_open)
            or (repo_type, repo_id, blob_id) in self._seen
        ):
            return None
        self._seen.add((repo_type, repo_id, blob_id))  # looked up at most once a while per blob
        rec = self.record(blob_id)
        if rec is not None and posixpath.basename(rec.path) == CONFIG and repo_type == "model":
            return self._config_opened(repo_type, repo_id, rec, blob_id, commit)
        if rec is not None and rec.path and not is_weight(rec.path):
            return None  # not a weight file: no file list is read (a dataset opens 10^5-10^6 of these)
        snapshots = self._candidates(repo_type, repo_id, rec, commit)
        if reads_here:
            self._reading(snapshots, blob_id)
        if all(s in self._tasks or s in self._planned for s in snapshots):
            if rec is not None and rec.path:  # a weight file (see above), read now as the first one was
                self.start(blob_id, self.workers)
            return next((self._tasks[s] for s in snapshots if s in self._tasks), None)  # planned lately
        found = self._snapshot_of(snapshots, blob_id)
        if found is None or not is_weight(found[1]):
            return None
        snapshot, path, files = found
        if snapshot in self._tasks or snapshot in self._planned:
            self.start(blob_id, self.workers)  # another shard's open planned it: this one is read now too
            return self._tasks.get(snapshot)
        self._planned.add(snapshot)
        fill = self._fill(snapshot, path, files, blob_id, reads_here)
        task = self._tasks[snapshot] = asyncio.get_running_loop().create_task(fill)
        task.add_done_callback(lambda t: (self._tasks.pop(snapshot, None), consume(t)))
        return task

    def _config_opened(
        self, repo_type: str, repo_id: str, rec: BlobRecord, blob_id: str, commit: str | None
    ) -> asyncio.Task | None:
        """A loader reads a model's config.json seconds before its weights (an inference engine
        starts its GPUs in between): start the weight file it opens first (snapplan.first_weight);
        its open plans the rest. The blob counts if the snapshot lists it as its root's config.json
        (an open through the mount names the blob, not the path the link was followed from; the
        record's path is where the blob was first seen, maybe another repo's folder). At most one
        such fill at a time on the node, so configs read at once fill one first shard."""
        if self._early is not None and not self._early.done():
            return None
        snapshots = self._candidates(repo_type, repo_id, rec, commit)
        if any(s in self._tasks or s in self._planned for s in snapshots):
            return None
        for snapshot in snapshots:
            files = self.index.snapshots.get(*snapshot) or []
            if any(f.path == CONFIG and f.blob_id == blob_id for f in files):
                break
        else:
            return None
        first = first_weight(files)
        if first is None:
            return None
        self._early = self.start(first.blob_id, self.workers)
        if self._early is not None:
            log.info("%s@%s: config.json opened, filling %s", repo_id, snapshot[2][:12], first.path)
        return self._early

    def _candidates(self, repo_type: str, repo_id: str, rec: BlobRecord | None, commit: str | None) -> list[Snapshot]:
        """Where the blob may have been opened: the given snapshot, else the repo's refs' (main
        first), then the one its record names. Reads refs only, no file list."""
        if commit is not None:
            return [(repo_type, repo_id, commit)]
        refs = self.index.refs.of(repo_type, repo_id)
        candidates = [refs[r] for r in sorted(refs, key=lambda r: (r != "main", r))]
        if rec is not None and (rec.repo_type, rec.repo_id) == (repo_type, repo_id) and rec.commit:
            candidates.append(rec.commit)
        return [(repo_type, repo_id, c) for c in dict.fromkeys(candidates)]

    def _snapshot_of(self, snapshots: list[Snapshot], blob_id: str) -> tuple[Snapshot, str, list[FileEntry]] | None:
        """The first of the candidate snapshots that lists the blob, its path there and its files."""
        for snapshot in snapshots:
            files = self.index.snapshots.get(*snapshot) or []
            path = locate(files, blob_id)
            if path is not None:
                return snapshot, path, files
        return None

    async def _fill(
        self, snapshot: Snapshot, opened: str, files: list[FileEntry], opened_blob: str, reads_here: bool
    ) -> None:
        # The opened shard is being read: its fill (started by the open) gets a worker per slot
        # and, as read-ahead, the connections before the background fills; the small files go beside it.
        reading = self.start(opened_blob, self.workers)
        small = small_files(files, opened)
        started = [t for f in small if (t := self.start(f.blob_id, None)) is not None]
        if started:
            await asyncio.wait(started)
        if reading is not None:
            await self.claimed(opened_blob)
        after, before = siblings(files, opened, await self._indexes(files, opened))
        order = after + before  # those before the opened one last: another loader may read them
        filled = {opened_blob, *(f.blob_id for f in small), *(f.blob_id for f in order)}
        if order and not self.fits({f.blob_id: f.size for f in files if f.blob_id in filled}):
            log.info("snapshot fill of %s@%s: its weights do not fit this node's cache, only what is read is filled",
                     snapshot[1], snapshot[2][:12])  # fmt: skip
            order = []
        log.info("snapshot fill of %s@%s after %s: %d small file(s), then %s", snapshot[1], snapshot[2][:12],
                 opened, len(started), ", ".join(f.path for f in order) or "no other weight file")  # fmt: skip
        self._orders[snapshot] = _Order([FileEntry(opened, 0, opened_blob), *after], 0 if reads_here else -1)
        while len(self._orders) > _PLANNED_MAX:
            self._orders.popitem(last=False)
        self._read_ahead(snapshot)  # shards complete already (a prefetch), cold in the page cache
        for f in order:
            if (task := self.start(f.blob_id, self.workers)) is not None:
                task.add_done_callback(lambda _, s=snapshot, b=f.blob_id: self._filled(s, b))
                await self.claimed(f.blob_id)
            else:  # complete (maybe since the window looked at it), or failing
                self._filled(snapshot, f.blob_id)

    def _reading(self, snapshots: list[Snapshot], blob_id: str) -> None:
        """A reader opened this weight file: the page cache is filled ahead of it from now on."""
        for snapshot in snapshots:
            order = self._orders.get(snapshot)
            if order is not None and (at := order.at.get(blob_id)) is not None:
                order.reading = at
                self._read_ahead(snapshot)

    def _read_ahead(self, snapshot: Snapshot) -> None:
        """Warm the complete shards that came into the window (shard_read_ahead after the newest one opened)."""
        order = self._orders.get(snapshot)
        if order is None or order.reading < 0:
            return
        end = read_ahead(order.ends, order.reading, self.cfg.shard_read_ahead)
        for f in order.files[max(order.looked, order.reading + 1) : end]:
            self._warm(order, f.blob_id)
        order.looked = max(order.looked, end)

    def _filled(self, snapshot: Snapshot, blob_id: str) -> None:
        """A fill of one of the snapshot's shards ended: warm it if the window passed over it."""
        order = self._orders.get(snapshot)
        at = None if order is None else order.at.get(blob_id)
        if order is None or at is None or order.reading < 0:
            return
        if order.reading < at < min(order.looked, read_ahead(order.ends, order.reading, self.cfg.shard_read_ahead)):
            self._warm(order, blob_id)

    def _warm(self, order: _Order, blob_id: str) -> None:
        rec = self.record(blob_id)
        if blob_id in order.warmed or rec is None or rec.state != "complete":
            return
        order.warmed.add(blob_id)
        task = asyncio.get_running_loop().create_task(self.warm(blob_id))
        self._warming.add(task)
        task.add_done_callback(lambda t: (self._warming.discard(t), consume(t)))

    async def _indexes(self, files: list[FileEntry], opened: str) -> dict[str, bytes]:
        """The checkpoint indexes beside the opened file that are stored already, by path."""
        indexes = {}
        for f in index_files(files, opened):
            rec = self.record(f.blob_id)
            if rec is not None and rec.state == "complete":
                try:
                    indexes[f.path] = await self.read(f.blob_id, 0, f.size)
                except OSError as e:
                    log.info("snapshot fill: cannot read %s: %s", f.path, e)
        return indexes

    def stop(self) -> list[asyncio.Task]:
        """Start no more shards ahead of the loaders (the tier is full; their fills are stopped by
        the caller): the running plans are cancelled, and replanned a while later (_REPLAN_AFTER)."""
        plans = list(self._tasks.values())
        for t in plans:
            t.cancel()
        return plans

    def tasks(self) -> list[asyncio.Task]:
        return [*self._tasks.values(), *self._warming]
