"""Which blobs eviction must spare: pinned, open, being fetched, filled or proven.

One object made before the store and the fill path and given to both at
construction: the fill path keeps these tables (it opens, fetches and proves),
pins keep theirs, the store only asks. Nothing is set on the store afterwards.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class InUse:
    pinned: dict[str, int] = field(default_factory=dict)  # blob id -> size, of the blobs pins keep (pin)
    pinned_bytes: int = 0  # their sizes' sum: what pins hold once filled (Filler.must_fit)
    open: dict[str, int] = field(default_factory=dict)  # blob id -> open handles / reads in progress
    # blob id -> holds of what is no reader (a scrub's re-hash, a peer's background fill, a prefetch
    # from the files it makes to its fills' ends): the blob is kept, but its fill's requests do not
    # go ahead as a reader's read-ahead does (blobfill.py)
    kept: dict[str, int] = field(default_factory=dict)
    inflight: dict[tuple[str, int], asyncio.Task] = field(default_factory=dict)  # (blob, chunk) fetches
    fetching: dict[str, int] = field(default_factory=dict)  # blob id -> its chunks in `inflight`
    running: dict[str, asyncio.Task] = field(default_factory=dict)  # whole-blob fills
    finishing: dict[str, asyncio.Task] = field(default_factory=dict)  # whole-blob proofs

    def protected(self, blob_id: str) -> bool:
        return (
            blob_id in self.pinned
            or self.open.get(blob_id, 0) > 0
            or self.kept.get(blob_id, 0) > 0
            or blob_id in self.running
            or blob_id in self.finishing
            or self.fetching.get(blob_id, 0) > 0
        )

    def pin(self, sizes: dict[str, int]) -> None:
        """The blobs pins keep from now on, with their sizes."""
        self.pinned.clear()
        self.pinned.update(sizes)
        self.pinned_bytes = sum(sizes.values())

    def fetch_started(self, key: tuple[str, int], task: asyncio.Task) -> None:
        """A chunk's fetch, counted by blob: eviction asks of every blob it looks at, and a scan of
        every fetch in flight per question made a round O(blobs x fetches)."""
        if key not in self.inflight:  # one count per key, as fetch_ended takes one away
            self.fetching[key[0]] = self.fetching.get(key[0], 0) + 1
        self.inflight[key] = task

    def fetch_ended(self, key: tuple[str, int]) -> None:
        if self.inflight.pop(key, None) is None:
            return
        left = self.fetching.pop(key[0], 0) - 1
        if left > 0:
            self.fetching[key[0]] = left
