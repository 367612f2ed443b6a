"""What a node does once at start: resolve the configured repos (retrying those that fail) and preload."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from .backoff import delays
from .catalog import Catalog
from .chunks import FillError
from .layout import InvalidName, RepoSpec
from .ops import Operations
from .pins import Pins
from .upstream import NotFound, UpstreamError

log = logging.getLogger(__name__)

RESOLVE_AT_ONCE = 4  # configured repos resolved at a time: one slow source does not hold the rest up,
# and a node with 1,000 configured repos does not ask its upstreams 1,000 things at once


class Configured:
    """The configured repos; one that fails never stops the others (or the start): it is named in
    `failing` (/v1/status, /readyz) and retried with backoff until it resolves. A repo the index
    holds already is shown from it at once (a restart waits on no upstream) and re-resolved in
    the background, like a ref refresh. Up to `at_once` of them are resolved at a time."""

    def __init__(self, catalog: Catalog, pins: Pins, failing: dict[str, dict], at_once: int = RESOLVE_AT_ONCE):
        self.catalog, self.pins, self.failing = catalog, pins, failing
        self.at_once = max(1, at_once)
        self._retry: dict[str, Iterator[float]] = {}

    async def add(self, specs: list[str]) -> asyncio.Task | None:
        """Resolve each spec the index lacks now; a task for the rest (re-resolving the known ones,
        retrying the ones that failed), None if there is nothing left to do."""
        known = [spec for spec in specs if self._indexed(spec)]
        await self._add_all([spec for spec in specs if spec not in known])

        async def background() -> None:
            await self._add_all(known, known=True)
            if self._retry:
                await self._retry_failing()

        return asyncio.get_running_loop().create_task(background()) if known or self._retry else None

    async def _add_all(self, specs: list[str], known: bool = False) -> None:
        """`_add_one` each spec, `at_once` workers taking them in order (never a task per spec)."""
        todo = iter(specs)

        async def worker() -> None:
            for spec in todo:
                await self._add_one(spec, known)

        await asyncio.gather(*(worker() for _ in range(min(self.at_once, len(specs)))))

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
        except (NotFound, UpstreamError, FillError, ValueError) as e:  # the next entry is still preloaded
            log.error("preload %s: %s", spec, e)
