"""Which bytes go when a tier passes its high watermark: quarantined evidence first
(oldest first), then the least recently read blobs nobody protects, down to the low mark."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .index import BlobRecord
from .quarantine import QuarantineDirs
from .tier import Tier


def evict_lru(
    tier: Tier,
    incoming: int,
    quarantine: QuarantineDirs,
    records: Iterable[BlobRecord],
    protected: Callable[[str], bool],
    evict: Callable[[BlobRecord], int],
) -> int:
    """Evict until `incoming` more bytes fit under the tier's low watermark; returns bytes freed."""
    freed = 0
    for path, size, _ in sorted(quarantine.files(tier), key=lambda e: e[2]):  # evidence before cache
        if tier.fits(incoming, tier.low):
            return freed
        freed += quarantine.unlink(tier, path, size)
    for rec in sorted(records, key=lambda r: r.last_access):
        if tier.fits(incoming, tier.low):
            break
        if rec.tier != tier.name or rec.state == "quarantined" or protected(rec.blob_id):
            continue
        freed += evict(rec)
    return freed
