"""Which bytes go when a tier passes its high watermark: quarantined evidence first
(oldest first), then the least recently read blobs nobody protects, down to the low mark.

The blobs come in order of last use (`by_last_use`, from the index's LRU order) and are
read only as far as eviction goes: a round costs the victims it evicts (and the protected
ones it passes), not every record."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator

from .index import BlobRecord
from .quarantine import QuarantineDirs
from .tier import Tier


def evict_lru(
    tier: Tier,
    incoming: int,
    quarantine: QuarantineDirs,
    records: Iterable[BlobRecord],  # least recently used first
    protected: Callable[[str], bool],
    evict: Callable[[BlobRecord], int],
) -> int:
    """Evict until `incoming` more bytes fit under the tier's low watermark; returns bytes freed."""
    freed = 0
    for path, size, _ in sorted(quarantine.files(tier), key=lambda e: e[2]):  # evidence before cache
        if tier.fits(incoming, tier.low):
            return freed
        freed += quarantine.unlink(tier, path, size)
    for rec in records:
        if tier.fits(incoming, tier.low):
            break
        if rec.tier != tier.name or rec.state == "quarantined" or protected(rec.blob_id):
            continue
        freed += evict(rec)
    return freed


def by_last_use(
    stored: Iterable[tuple[float, str]], record: Callable[[str], BlobRecord | None]
) -> Iterator[BlobRecord]:
    """Records in order of last use, from `stored` ((last_access as stored, blob id), in order)
    and the shared records (`record`), whose access times are newer while not yet flushed: one
    read since its stored time goes back in line, at its real time."""
    later: list[tuple[float, str, BlobRecord]] = []
    for at, blob_id in stored:
        while later and later[0][0] <= at:
            yield heapq.heappop(later)[2]
        rec = record(blob_id)
        if rec is None:
            continue
        if rec.last_access > at:
            heapq.heappush(later, (rec.last_access, blob_id, rec))
        else:
            yield rec
    while later:
        yield heapq.heappop(later)[2]
