"""What a node does once at start: resolve the configured repos (retrying those that fail) and preload."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from .backoff import delays
from .catalog import Catalog
from .layout import InvalidName, RepoSpec
from .ops import Operations
from .pins import Pins
from .upstream import NotFound, UpstreamError

log = logging.getLogger(__name__)


class Configured:
    """The configured repos; one that fails never stops the others (or the start): it is named in
    `failing` (/v1/status, /readyz) and retried with backoff until it resolves. A repo the index
    holds already is shown from it at once (a restart waits on no upstream) and re-resolved in
    the background, like a ref refresh."""

    def __init__(self, catalog: Catalog, pins: Pins, failing: dict[str, dict]):
        self.catalog, self.pins, self.failing = catalog, pins, failing
        self._retry: dict[str, Iterator[float]] = {}

    async def add(self, specs: list[str]) -> asyncio.Task | None:
        """Resolve each spec the index lacks now; a task for the rest (re-resolving the known ones,
        retrying the ones that failed), None if there is nothing left to do."""
        known = [spec for spec in specs if self._indexed(spec)]
        for spec in specs:
            if spec not in known:
                await self._add_one(spec)

        async def background() -> None:
            for spec in known:
                await self._add_one(spec, known=True)
            if self._retry:
                await self._retry_failing()

        return asyncio.get_running_loop().create_task(background()) if known or self._retry else None

    def _indexed(self, spec: str) -> bool:
        try:
            return self.catalog.indexed(RepoSpec.parse(spec))
        except InvalidName:
            return False

    async def _add_one(self, spec: str, known: bool = False) -> None:
        try:  # no file list read back: a snapshot of 10^6 files decodes in seconds
            ref = await self.catalog.ensure(RepoSpec.parse(spec))
            log.info("repo %s: %s", ref, "re-resolved" if known else "resolved")
        except Exception as e:  # a typo, a 404, the Hub down, metadata we refuse
            self._retry[spec] = delays(base=2.0, cap=300.0)
            self._failed(spec, e)

    def _failed(self, spec: str, e: Exception) -> None:
        wait = next(self._retry[spec])
        log.error("repo %s: %s (retrying in %.0f s)", spec, e, wait)
        self.failing[spec] = {"error": f"{e.__class__.__name__}: {e}", "retry_at": time.time() + wait}

    async def _retry_failing(self) -> None:
        while self.failing:
            spec = min(self.failing, key=lambda s: self.failing[s]["retry_at"])
            await asyncio.sleep(max(0.0, self.failing[spec]["retry_at"] - time.time()))
            try:
                ref = await self.catalog.ensure(RepoSpec.parse(spec))
            except Exception as e:
                self._failed(spec, e)
                continue
            del self.failing[spec]
            log.info("repo %s: resolved on retry", ref)
            self.pins.refresh()


async def preload(ops: Operations, entries: tuple[str, ...]) -> None:
    """Fill the configured preload list at start, one repo at a time, in order."""
    for entry in entries:
        spec, _, mode = entry.partition("=")
        try:
            job = await (ops.pin(RepoSpec.parse(spec), mode) if mode else ops.prefetch(RepoSpec.parse(spec)))
            if job.task is not None:
                await asyncio.wait([job.task])
            log.info("preload %s: %s", spec, job.state)
        except (NotFound, UpstreamError, ValueError) as e:
            log.error("preload %s: %s", spec, e)
