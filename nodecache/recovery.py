"""What a start learns from the index and the disk before serving: each tier's
usage, files nobody claims, and chunks recorded but not durably written.

A clean stop leaves each tier's usage in the index beside the tier's mark (a
random name kept in the tier's `blobs/.mark-<name>/`), synced after the blob files
were; a start that finds that record, with every mark unchanged, takes the
usage from it and has nothing to recover: O(tiers), not O(blobs). The record
must be the index's last write (its transaction id says so) and is deleted
(durably) before serving, so a crash since leaves none, a write by anyone
else to the stopped index voids it, and a tier that lost its files (shm
after a reboot) has a new mark: then every record is read and checked, the
usage counted and the chunks recovered from the index and the disk. Even
then a start reads only the records of blobs that hold bytes (partial with a
chunk recorded, or a file on disk not complete): the complete bytes per tier
are counted by the index's writes, and the 10^6 records of a dataset nobody
fetched are never read.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from .blobfile import bad_chunks, release_unrecorded
from .index import Index
from .presence import BlobState
from .quarantine import QuarantineDirs
from .tier import Tier

log = logging.getLogger(__name__)

_CLEAN = "clean_stop"
_LIBC = ctypes.CDLL(None, use_errno=True)


def tier_mark(tier: Tier) -> str:
    """The tier's mark, made if it has none (a new or wiped tier): the name of an empty
    directory `blobs/.mark-<random>` (made atomically; no file beside the blob files)."""
    found = [p for p in tier.blobs.glob(".mark-*") if p.is_dir()]
    if len(found) == 1:
        return found[0].name.removeprefix(".mark-")
    for p in found:  # more than one: none can be trusted
        p.rmdir()
    mark = uuid.uuid4().hex
    (tier.blobs / f".mark-{mark}").mkdir()
    return mark


def take_clean_stop(index: Index, tiers: dict[str, Tier]) -> str:
    """At start: what the last stop left. "clean": a clean stop, the index untouched since and
    every tier with its files (each tier's usage is set from the record); "written": a clean
    stop, then someone else wrote to the index (what it derives from its records may not hold:
    check every record); "crash": anything else (no record: a kill -9, or a tier lost its
    files), where the index's own transactions still hold. The record is gone (durably) either way."""
    saved = index.meta.get(_CLEAN)
    untouched = isinstance(saved, dict) and index.meta.untouched_since(saved)  # before the delete below
    index.meta.put(_CLEAN, None, sync=True)
    if not isinstance(saved, dict):
        return "crash"
    if not untouched:
        return "written"
    usage = saved.get("tiers")
    if not isinstance(usage, dict) or set(usage) != set(tiers):
        return "crash"
    for name, tier in tiers.items():
        entry = usage[name]
        if not isinstance(entry, dict) or entry.get("mark") != tier_mark(tier) or type(entry.get("used")) is not int:
            return "crash"
    for name, tier in tiers.items():
        tier.used = max(0, usage[name]["used"])
    return "clean"


def _syncfs(tiers: list[Tier]) -> None:
    for tier in tiers:
        fd = os.open(tier.blobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _LIBC.syncfs(fd)
        finally:
            os.close(fd)


def leave_clean_stop(index: Index, tiers: dict[str, Tier], synced: bool, sync_timeout: float = 5.0) -> None:
    """At a clean stop (nothing in flight): flush the tiers' files unless every chunk was
    synced before it was recorded, then record each tier's usage and mark.

    syncfs flushes the whole filesystem, other tenants' dirty pages too: on a busy
    disk it can take longer than a pod's grace period. Past `sync_timeout` the stop
    goes on without the record, and the next start counts and recovers (correct,
    only slower)."""
    if not synced:
        flush = threading.Thread(target=_syncfs, args=(list(tiers.values()),), name="nodecache-syncfs", daemon=True)
        flush.start()
        flush.join(sync_timeout)
        if flush.is_alive():
            log.warning("syncfs took over %.0fs: no clean-stop record, the next start recovers", sync_timeout)
            return
    index.meta.put_last(_CLEAN, {"tiers": {name: {"used": t.used, "mark": tier_mark(t)} for name, t in tiers.items()}})


def _on_disk(tiers: dict[str, Tier]) -> dict[str, set[str]]:
    """tier name -> names of its blob files (a directory listing: no stat per blob)."""
    return {name: {p.name for p in t.blobs.glob("*/*")} for name, t in tiers.items()}


def load_usage(index: Index, tiers: dict[str, Tier], quarantine: QuarantineDirs) -> None:
    """Count each tier's bytes from the index; drop what disagrees with the disk.

    Reads no record of a blob that holds nothing: complete bytes come from the index's
    per-tier counter (less any complete blob whose file is gone: its record is read), partial
    bytes from the blobs with chunks recorded, orphans from a key lookup per file on disk."""
    on_disk = _on_disk(tiers)
    anywhere = set().union(*on_disk.values())
    for name, n in index.counts.complete_bytes().items():
        if name in tiers:
            tiers[name].used += n
    for blob_id in index.counts.complete_ids() - anywhere:
        rec = index.blobs.get(blob_id)
        if rec is not None and rec.state == "complete" and rec.tier in tiers:
            tiers[rec.tier].used -= rec.size  # recover() and Store.state() forget its chunks
    for blob_id in index.counts.chunked_ids():
        rec = index.blobs.get(blob_id)
        if rec is None or rec.state != "partial" or rec.tier not in tiers or blob_id not in on_disk[rec.tier]:
            continue
        tiers[rec.tier].used += BlobState(rec, index.chunks.get(blob_id)).cached
    for name, tier in tiers.items():
        for blob_id in on_disk[name]:
            if not index.blobs.has(blob_id):  # a file no index entry claims
                path = tier.blob_path(blob_id)
                log.warning("removing orphan blob file %s", path)
                path.unlink(missing_ok=True)
        tier.used += sum(size for _, size, _ in quarantine.files(tier))


def recover(index: Index, tiers: dict[str, Tier], path_of: Callable[[str], Path]) -> int:
    """Re-verify every recorded chunk of partial blobs against its xxh3.

    Run once at start, after load_usage: a chunk recorded but not durably on
    disk (power loss without fsync, a truncated file) is forgotten, no longer
    counted in its tier's usage, and fetched again; bytes written but never
    recorded are given back. Reads the records of the blobs with chunks recorded
    or a file on disk that is not complete, no other. Returns how many chunks
    were dropped.
    """
    dropped = 0
    on_disk = set().union(*_on_disk(tiers).values())
    for blob_id in sorted(set(index.counts.chunked_ids()) | (on_disk - index.counts.complete_ids())):
        rec = index.blobs.get(blob_id)
        if rec is None or rec.state != "partial":
            continue
        chunks = index.chunks.get(rec.blob_id)
        path = path_of(rec.blob_id)
        if rec.blob_id not in on_disk:
            if chunks:
                index.chunks.drop(rec.blob_id)
                dropped += len(chunks)
            continue
        bad = bad_chunks(path, rec.chunk_size, rec.size, chunks) if chunks else []
        if bad:
            index.chunks.drop(rec.blob_id, bad)
            dropped += len(bad)
            if rec.tier in tiers:
                st = BlobState(rec, chunks)
                tiers[rec.tier].used -= sum(st.chunk_len(i) for i in bad)
        release_unrecorded(path, rec.chunk_size, rec.size, set(chunks) - set(bad))
    return dropped
