"""Uploading the snapshots this node sealed itself to the compile-cache bucket: once each, in the
background, retried with backoff (5 s doubling to 5 min) after a failure."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from .backoff import delays
from .cckeys import Key
from .ccmanifest import Manifest
from .ccupstream import S3Snapshots, UpstreamFailed

log = logging.getLogger("nodecache.compilecache")


class Uploads:
    def __init__(
        self,
        upstream: S3Snapshots,
        node: str,
        blob_path: Callable[[str], Path | None],
        is_current: Callable[[Key], bool],
        save: Callable[[Key], None],
        on_event: Callable[[str], None],
    ):
        """`is_current(k)`: the key is still this node's (not evicted meanwhile); `save(k)` records `uploaded`."""
        self.upstream, self.node, self.blob_path = upstream, node, blob_path
        self.is_current, self.save, self.on_event = is_current, save, on_event
        self._tasks: dict[str, asyncio.Task] = {}
        self._retry: dict[str, tuple[float, object]] = {}  # name -> (not before, delays iterator)

    def start(self, k: Key, now: float) -> None:
        """Upload the key's snapshot if this node sealed it and it is not uploaded yet."""
        m = k.sealed
        if m is None or m.node != self.node or k.uploaded == m.id:
            return
        if k.name in self._tasks or now < self._retry.get(k.name, (0.0, None))[0]:
            return
        self._tasks[k.name] = asyncio.get_running_loop().create_task(self._upload(k, m))

    async def _upload(self, k: Key, m: Manifest) -> None:
        try:
            n = await self.upstream.publish(m, self.blob_path)
        except (UpstreamFailed, OSError) as e:
            retry = self._retry.get(k.name, (0.0, delays(5.0, 300.0)))[1]
            wait = next(retry)
            self._retry[k.name] = (time.time() + wait, retry)
            log.warning("compile cache %s: upload to %s failed (%s); again in %.0fs", k.key, self.upstream.url, e, wait)
            return
        finally:
            self._tasks.pop(k.name, None)
        self._retry.pop(k.name, None)
        if self.is_current(k):
            k.uploaded = m.id
            self.save(k)
        self.on_event("upload")
        log.info("compile cache %s: snapshot %s uploaded to %s (%d new blobs)", k.key, m.id[:12], self.upstream.url, n)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self.upstream.close()
