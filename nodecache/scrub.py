"""Scrub: complete blobs are re-hashed, so bit rot after the proof is found, not served.

A blob is proven once, when its last byte arrives; after that its file is read
by the kernel (passthrough) and sent to peers without another check. The
scrubber re-hashes complete blobs in the background at `scrub_bps`, oldest
proof first (the time of the last proof is kept in the index, so a restart
continues the pass), each at most once per `scrub_interval`; `verify()` does the same
at full speed for a job (`POST /v1/verify`). A blob that no longer proves its
id is quarantined like a failed fill (its pages dropped, open handles EIO,
peers refused) and fetched again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable

from .fill import Filler, FillError
from .metrics import Metrics
from .peers import RateLimit
from .store import Store
from .upstream import UpstreamError

log = logging.getLogger(__name__)

_IDLE = (1.0, 60.0)  # nothing due: look again after the next one is due, within these bounds
MAX_LISTED = 100  # failed blob ids a verify job lists


class Scrubber:
    def __init__(self, store: Store, filler: Filler, metrics: Metrics, bps: int, interval: float = 86400.0):
        self.store = store
        self.filler = filler
        self.metrics = metrics
        self.bps = bps
        self.interval = interval
        self._pacer = RateLimit(bps)
        self._repairs: dict[str, asyncio.Task] = {}

    def due(self, now: float) -> tuple[list[str], float]:
        """Complete blobs whose last proof is older than scrub_interval, oldest first, and
        (when there are none) the seconds until the next one is. The index keeps complete
        blobs in order of their last proof: a pass reads the due ones, not every record."""
        due, oldest = self.store.index.counts.proven_by(now - self.interval)
        wait = oldest + self.interval - now if oldest is not None else self.interval
        return due, wait

    async def run(self) -> None:
        """The background pass, at most scrub_bps; returns at once when scrub_bps is 0."""
        while self.bps > 0:
            due, wait = self.due(time.time())
            if not due:
                await asyncio.sleep(min(max(wait, _IDLE[0]), _IDLE[1]))
                continue
            for blob_id in due:  # check() skips what changed since the scan
                try:
                    await self.check(blob_id, self._pacer.take)
                except Exception:  # one blob's trouble must not end the scrub for good
                    log.exception("scrub of %s failed", blob_id)
                    await asyncio.sleep(_IDLE[0])

    async def check(
        self, blob_id: str, pace: Callable | None = None, hashed: Callable[[int], None] | None = None
    ) -> bool | None:
        """Re-hash one complete blob. True: it still proves its id; False: it did not (it is
        quarantined and being fetched again); None: not checked (not complete, or changed meanwhile).
        `pace(n)` is awaited before each piece is read, `hashed(n)` called after it."""
        rec = self.store.record(blob_id)
        if rec is None or rec.state != "complete":
            return None
        generation = self.filler.generation(blob_id)

        def counted(n: int) -> None:
            self.metrics.scrubbed_bytes.inc(n)
            if hashed is not None:
                hashed(n)

        self.filler.hold(blob_id, paged=False, reader=False)  # not evicted under the hash; no reader
        try:
            got = await self.store.rehash(rec, pace, counted)
        except FileNotFoundError:
            return None  # lost under us: the store refetches it on the next read
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            got = f"unreadable ({e})"  # a disk that cannot read it back: damage too
        finally:
            self.filler.release(blob_id, paged=False, reader=False)
        if rec.state != "complete" or self.filler.generation(blob_id) != generation:
            return None
        if got is None or got == blob_id:
            rec.verified_at = time.time()
            self.store.index.blobs.put(rec)
            return True
        log.error("scrub: blob %s (%s/%s) now hashes to %s; quarantined, fetching it again",
                  blob_id, rec.repo_id, rec.path, got)  # fmt: skip
        self.store.quarantine(self.store.state(rec))
        self.filler.quarantined(blob_id, "scrub", [])
        self._repair(blob_id)
        return False

    def _repair(self, blob_id: str) -> asyncio.Task:
        task = self._repairs.get(blob_id)
        if task is None:
            task = self._repairs[blob_id] = asyncio.get_running_loop().create_task(self.filler.fill_blobs([blob_id]))
            task.add_done_callback(lambda t: (self._repairs.pop(blob_id, None), self._repaired(blob_id, t)))
        return task

    @staticmethod
    def _repaired(blob_id: str, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("scrub: fetching %s again failed: %s", blob_id, task.exception())

    async def verify(self, blob_ids: list[str], progress: Callable[[int], None]) -> dict:
        """A verify job: every complete blob re-hashed at full speed, every recorded chunk of a
        partial blob re-checked against its xxh3; damaged blobs fetched again before it ends."""
        ids = list(dict.fromkeys(blob_ids))
        done = 0
        failed: list[str] = []
        dropped = 0

        def counted(n: int) -> None:
            nonlocal done
            done += n
            progress(done)

        for blob_id in ids:
            rec = self.store.record(blob_id)
            if rec is None:
                continue
            if rec.state == "complete":
                before = done
                if await self.check(blob_id, hashed=counted) is False:
                    failed.append(blob_id)
                done = before + rec.size
            elif rec.state == "partial":
                dropped += await self.store.check_chunks(rec)
                done += rec.size
            else:
                done += rec.size
            progress(done)
        for blob_id in failed:  # joins the repair started by check()
            try:
                await self.filler.fill_blobs([blob_id])
            except (FillError, UpstreamError) as e:
                raise FillError(f"blob {blob_id} failed verification and could not be fetched again: {e}") from None
        return {
            "checked": len(ids),
            "failed": len(failed),
            "failed_blobs": failed[:MAX_LISTED],
            "dropped_chunks": dropped,
        }

    async def close(self) -> None:
        tasks = list(self._repairs.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
