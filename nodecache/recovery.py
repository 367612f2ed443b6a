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
usage counted and the chunks recovered from the index and the disk, as every
start used to do.
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


def take_clean_stop(index: Index, tiers: dict[str, Tier]) -> bool:
    """At start: if the last stop was clean and every tier kept its files, set each tier's
    usage from it and return True. The record is gone (durably) either way."""
    saved = index.get_meta(_CLEAN)
    if not isinstance(saved, dict) or not index.untouched_since(saved):
        saved = None  # a crash, or someone wrote to the index after the stop: check everything
    index.put_meta(_CLEAN, None, sync=True)
    usage = saved.get("tiers") if saved else None
    if not isinstance(usage, dict) or set(usage) != set(tiers):
        return False
    for name, tier in tiers.items():
        entry = usage[name]
        if not isinstance(entry, dict) or entry.get("mark") != tier_mark(tier) or type(entry.get("used")) is not int:
            return False
    for name, tier in tiers.items():
        tier.used = max(0, usage[name]["used"])
    return True


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
    index.put_last(_CLEAN, {"tiers": {name: {"used": t.used, "mark": tier_mark(t)} for name, t in tiers.items()}})


def load_usage(index: Index, tiers: dict[str, Tier], quarantine: QuarantineDirs) -> None:
    """Count each tier's bytes from the index; drop what disagrees with the disk."""
    known: set[str] = set()
    recs = index.all_blobs()  # checks each record: a bad one is dropped here
    index.recount_blobs(recs)
    for rec in recs:
        known.add(rec.blob_id)
        tier = tiers.get(rec.tier)
        if tier is None or rec.state == "quarantined":
            continue
        if not tier.blob_path(rec.blob_id).exists():
            continue  # recover() and Store.state() forget its chunks
        if rec.state == "complete":
            tier.used += rec.size
        else:
            tier.used += BlobState(rec, index.chunks(rec.blob_id)).cached
    for tier in tiers.values():
        for path in tier.blobs.glob("*/*"):
            if path.name not in known:  # a file no index entry claims
                log.warning("removing orphan blob file %s", path)
                path.unlink(missing_ok=True)
        tier.used += sum(size for _, size, _ in quarantine.files(tier))


def recover(index: Index, tiers: dict[str, Tier], path_of: Callable[[str], Path]) -> int:
    """Re-verify every recorded chunk of partial blobs against its xxh3.

    Run once at start, after load_usage: a chunk recorded but not durably on
    disk (power loss without fsync, a truncated file) is forgotten, no longer
    counted in its tier's usage, and fetched again. Returns how many chunks
    were dropped.
    """
    dropped = 0
    on_disk = {p.name for t in tiers.values() for p in t.blobs.glob("*/*")}  # no stat per blob
    for rec in index.all_blobs():
        if rec.state != "partial":
            continue
        if rec.blob_id not in on_disk and not index.has_chunks(rec.blob_id):
            continue  # nothing fetched yet (most blobs of a big dataset): nothing to check or give back
        chunks = index.chunks(rec.blob_id)
        path = path_of(rec.blob_id)
        if rec.blob_id not in on_disk:
            if chunks:
                index.drop_chunks(rec.blob_id)
                dropped += len(chunks)
            continue
        bad = bad_chunks(path, rec.chunk_size, rec.size, chunks) if chunks else []
        if bad:
            index.drop_chunks(rec.blob_id, bad)
            dropped += len(bad)
            if rec.tier in tiers:
                st = BlobState(rec, chunks)
                tiers[rec.tier].used -= sum(st.chunk_len(i) for i in bad)
        release_unrecorded(path, rec.chunk_size, rec.size, set(chunks) - set(bad))
    return dropped
