"""What an operator asks of a node (/v1, the CLI, preload): prefetch, pin, unpin, verify, evict.

Each is a few calls on the catalog, the pins, the store and the jobs; the
control API is a thin JSON layer over this.
"""

from __future__ import annotations

import logging

from .catalog import Catalog
from .fill import Filler, FillError
from .index import Index
from .jobs import Job, Jobs
from .layout import RepoSpec
from .pins import Pins
from .repos import RepoRef
from .scrub import Scrubber
from .store import Store

log = logging.getLogger(__name__)


class Operations:
    def __init__(
        self, catalog: Catalog, pins: Pins, index: Index, store: Store, filler: Filler, jobs: Jobs, scrubber: Scrubber
    ):
        self.catalog, self.pins, self.index, self.store = catalog, pins, index, store
        self.filler, self.jobs, self.scrubber = filler, jobs, scrubber
        # Where pinned revisions moved to that the cache cannot hold beside the other pins: asked
        # (and logged) once, not every round, until the pins change (or a restart: a new cache size).
        self._refused: set[RepoRef] = set()

    async def resolve(self, spec: RepoSpec) -> dict:
        """Resolve only (the tree shows it, no byte is fetched): what it is."""
        ref, sizes, _ = await self.catalog.add_repo(spec)
        meta = self.index.repo_meta.get(ref.repo_type, ref.repo_id) or {}
        return {
            "repo": ref.repo_id,
            "repo_type": ref.repo_type,
            "revision": ref.revision,
            "commit": ref.commit,
            "total": sum(sizes.values()),
            "visibility": meta.get("visibility", "unknown"),
        }

    async def prefetch(self, spec: RepoSpec) -> Job:
        ref, sizes, blobs = await self.catalog.add_repo(spec)
        self.filler.must_fit(ref, sizes)
        return self.jobs.start(ref, blobs, sum(sizes.values()))

    def job(self, job_id: str) -> Job | None:
        return self.jobs.jobs.get(job_id)

    async def pin(self, spec: RepoSpec, mode: str = "pin") -> Job:
        """Keep a revision forever (mode "hot": in shm when it fits) and fill it now."""
        if mode not in ("pin", "hot"):
            raise ValueError(f"pin mode must be 'pin' or 'hot', not {mode!r}")
        ref, sizes, blobs = await self.catalog.add_repo(spec)
        # Pinned before, maybe at another commit: what only that pin keeps is room.
        self.filler.must_fit(ref, sizes, pinned=True, hot=mode == "hot", kept=self.pins.besides(ref))
        self.pins.hold(ref, mode)
        self._refused.clear()  # the pins changed: a moved pin refused beside them may fit now
        return self.jobs.start(ref, blobs, sum(sizes.values()))

    def unpin(self, spec: RepoSpec) -> bool:
        found = self.index.pins.delete(spec.repo_type, spec.repo_id, spec.rev)
        self.pins.refresh()
        self._refused.clear()  # what it kept is room now: a moved pin refused beside it may fit
        return found

    def fill_pinned(self) -> None:
        """Pinned revisions follow their refs while the cache can hold what a moved ref names;
        a pin whose revision moved to more than that keeps the commit it holds (its blobs stay
        pinned, the new revision's are read lazily and evictable). Then fill what a pin holds."""
        self.pins.refresh()
        for held, now, mode in self.pins.moved():
            if now in self._refused:
                continue
            try:
                self._must_fit_pinned(now, mode, kept=self.pins.besides(now))
            except FillError as e:  # listed and read lazily, not filled
                log.error("pin: %s; the pin keeps %s", e, held.commit[:12])
                self._refused.add(now)
                continue
            self.pins.hold(now, mode)
            self._refused.clear()
        for ref, mode in self.pins.refs():
            try:
                blobs = self._must_fit_pinned(ref, mode)
            except FillError as e:
                log.error("pin: %s", e)
                continue
            if blobs:
                self.jobs.start(ref, list(blobs), sum(blobs.values()))

    def pins_to_move(self) -> bool:
        """Whether a pinned revision names a commit its pin has not taken or refused (a ref the
        mirror or a lookup re-resolved moves outside the housekeeping's refresh)."""
        return any(now not in self._refused for _, now, _ in self.pins.moved())

    def _must_fit_pinned(self, ref: RepoRef, mode: str, kept: dict[str, int] | None = None) -> dict[str, int]:
        """{blob id: size} of the pinned revision if any of it is missing (FillError if it can never be
        whole here beside what pins keep: `kept`, else every pin's), else {}. Whole or not comes from
        the index's per-snapshot counts and the sizes from its file list: no blob record is read
        (each read one pulled it into the store's shared records, a pinned dataset's all of them)."""
        if self.index.links.snapshots_missing(ref.repo_type, ref.repo_id).get(ref.commit) == 0:
            return {}
        sizes = {f.blob_id: f.size for f in self.index.snapshots.get(ref.repo_type, ref.repo_id, ref.commit) or []}
        self.filler.must_fit(ref, sizes, pinned=True, hot=mode == "hot", kept=kept)
        return sizes

    def cached_blobs(self, spec: RepoSpec | None) -> tuple[RepoRef | None, list[str]]:
        """The blobs of one cached repo (every snapshot, or the revision in `spec`), or of the whole
        cache (spec None); KeyError if the repo is not in the cache. The ref names what was asked."""
        if spec is None:
            return None, [r.blob_id for r in self.index.blobs.all()]
        repo_type, repo_id, revision = spec.repo_type, spec.repo_id, spec.revision
        view = self.index.view(repo_type, repo_id)  # this repo only, not the whole index
        if view is None:
            raise KeyError(f"{repo_type} {repo_id} is not in the cache")
        if revision is None:
            ref = RepoRef(repo_type, repo_id, "", "")
            commits = list(view.snapshots)
        else:
            ref = RepoRef(repo_type, repo_id, revision, view.refs.get(revision, revision))
            commits = [ref.commit]
        return ref, list(dict.fromkeys(f.blob_id for c in commits for f in view.snapshots.get(c, [])))

    def verify(self, spec: RepoSpec | None) -> Job:
        """Re-check the stored bytes of one repo (or revision), or of the whole cache, as a job."""
        ref, blob_ids = self.cached_blobs(spec)
        total = sum(rec.size for b in blob_ids if (rec := self.store.record(b)) is not None)
        return self.jobs.start(ref, blob_ids, total, kind="verify", work=self.scrubber.verify)

    def evict(self, spec: RepoSpec | None) -> tuple[int, int, int]:
        """Evict the blobs of one repo (or revision), or every unpinned blob.

        Returns (blobs evicted, bytes freed, blobs kept because pinned or in use).
        """
        blob_ids = self.cached_blobs(spec)[1]
        evicted = freed = kept = 0
        for blob_id in dict.fromkeys(blob_ids):
            rec = self.store.record(blob_id)
            if rec is None or self.store.cached_bytes(rec) == 0:
                continue
            if self.filler.protected(blob_id):
                kept += 1
                continue
            freed += self.store.evict(rec)
            evicted += 1
        return evicted, freed, kept
