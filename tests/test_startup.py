"""Configured repos at start: resolved a few at a time, a failure never holding up the others.

The catalog here is a recording double: what is tested is how `Configured` schedules the
resolutions (the resolutions themselves are tested against the Hub emulator elsewhere)."""

from __future__ import annotations

import asyncio

from nodecache.layout import RepoSpec
from nodecache.startup import RESOLVE_AT_ONCE, Configured


class RecordingCatalog:
    """Counts resolutions in flight; each one yields to the loop a few times, as a request would."""

    def __init__(self, indexed: set[str] = frozenset(), broken: set[str] = frozenset()):
        self.known, self.broken = indexed, broken
        self.inflight = self.most = 0
        self.resolved: list[str] = []

    def indexed(self, spec: RepoSpec) -> bool:
        return spec.repo_id in self.known

    async def ensure(self, spec: RepoSpec):
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        try:
            for _ in range(5):
                await asyncio.sleep(0)
            if spec.repo_id in self.broken:
                raise RuntimeError("the Hub is down for this one")
            self.resolved.append(spec.repo_id)
            return spec.repo_id
        finally:
            self.inflight -= 1


class NoPins:
    def refresh(self) -> None:
        pass


def test_configured_repos_resolve_concurrently_within_a_bound():
    specs = [f"org/m{i}" for i in range(10)]
    catalog = RecordingCatalog(broken={"org/m3"})
    failing: dict[str, dict] = {}

    async def main():
        task = await Configured(catalog, NoPins(), failing).add(specs)
        assert task is not None  # the broken one is retried in the background
        task.cancel()

    asyncio.run(main())
    assert catalog.most == RESOLVE_AT_ONCE, f"{catalog.most} resolutions at a time"
    assert sorted(catalog.resolved) == sorted(s for s in specs if s != "org/m3")
    assert list(failing) == ["org/m3"] and "the Hub is down" in failing["org/m3"]["error"]


def test_known_repos_are_re_resolved_concurrently_in_the_background():
    specs = [f"org/k{i}" for i in range(6)]
    catalog = RecordingCatalog(indexed=set(specs))

    async def main():
        task = await Configured(catalog, NoPins(), {}, at_once=2).add(specs)
        assert catalog.resolved == [], "a restart waits on no upstream"
        await task

    asyncio.run(main())
    assert catalog.most == 2 and sorted(catalog.resolved) == specs
