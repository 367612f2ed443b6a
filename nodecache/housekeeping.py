"""The daemon's periodic rounds: each runs every `period` seconds; a round that fails is logged and
counted, and the next one runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from .catalog import Catalog
from .labels import NodeLabeler
from .ops import Operations
from .readiness import ReadyRepos
from .store import Store

log = logging.getLogger("nodecache.daemon")


async def every(period: float, what: str, round: Callable[[], Awaitable[None]], failed: Callable[[], None]) -> None:
    """Run `round` every `period` seconds until cancelled; `failed()` counts a round that raised."""
    while True:
        await asyncio.sleep(period)
        try:
            await round()
        except Exception:
            log.exception("%s round failed", what)
            failed()


class Housekeeping:
    """Persist access times (LRU order survives a restart), re-check refs, label the node."""

    def __init__(self, store: Store, catalog: Catalog, ops: Operations, labeler: NodeLabeler | None, ready: ReadyRepos):
        self.store, self.catalog, self.ops, self.labeler, self.ready = store, catalog, ops, labeler, ready

    async def round(self) -> None:
        self.store.flush_access_times()
        self.store.clean_quarantine()  # the age bound; count and bytes hold at every quarantine
        if await self.catalog.refresh_refs() or self.ops.pins_to_move():
            self.ops.fill_pinned()  # pinned revisions follow their refs
        if self.labeler is not None:
            try:
                await self.labeler.sync(self.ready.labels())
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
                log.warning("node labels: %s", e)
