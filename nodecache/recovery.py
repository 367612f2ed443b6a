"""What a start learns from the index and the disk before serving: each tier's
usage, files nobody claims, and chunks recorded but not durably written."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .blobfile import bad_chunks, release_unrecorded
from .index import Index
from .presence import BlobState
from .quarantine import QuarantineDirs
from .tier import Tier

log = logging.getLogger(__name__)


def load_usage(index: Index, tiers: dict[str, Tier], quarantine: QuarantineDirs) -> None:
    """Count each tier's bytes from the index; drop what disagrees with the disk."""
    known: set[str] = set()
    for rec in index.all_blobs():
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

    Run once at start: a chunk recorded but not durably on disk (power loss
    without fsync, a truncated file) is forgotten and fetched again.
    Returns how many chunks were dropped.
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
        release_unrecorded(path, rec.chunk_size, rec.size, set(chunks) - set(bad))
    return dropped
