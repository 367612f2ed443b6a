"""Pinned revisions: which blobs are never evicted, and which go to shm while it has room."""

from __future__ import annotations

from .index import BlobRecord, Index
from .inuse import InUse
from .repos import RepoRef
from .tier import Tier


class Pins:
    """The pinned and "hot" blob sets, recomputed from the index's pins: the pinned ones (and
    their sizes) go to `in_use`, which eviction spares and the fill's space bound counts
    (shared with the store and the filler); the hot ones to the shm placement."""

    def __init__(self, index: Index, shm: Tier | None, shm_file_max: int, in_use: InUse | None = None):
        self.index, self.shm, self.shm_file_max = index, shm, shm_file_max
        self.in_use = InUse() if in_use is None else in_use
        self.hot: set[str] = set()  # blob ids of "hot" pins: in shm when they fit

    def place(self, rec: BlobRecord) -> str:
        """Small files and blobs of "hot" pins go to shm while it has room."""
        shm = self.shm
        if shm is not None and (rec.size <= self.shm_file_max or rec.blob_id in self.hot):
            if shm.fits(rec.size + shm.promised, shm.high):  # with the blobs placed there, not yet stored
                return "shm"
        return "disk"

    def refs(self) -> list[tuple[RepoRef, str]]:
        """(ref, mode) of every pin, at the commit it holds (see `moved` for where its revision is now)."""
        return [(held, mode) for held, _, mode in self.all()]

    def moved(self) -> list[tuple[RepoRef, RepoRef, str]]:
        """(held, now, mode) of every pin whose revision names another commit than the one it holds."""
        return [(held, now, mode) for held, now, mode in self.all() if now.commit != held.commit]

    def hold(self, ref: RepoRef, mode: str) -> None:
        """Pin `ref`'s revision at its commit (the blobs of the commit held before are let go)."""
        self.index.pins.put(ref.repo_type, ref.repo_id, ref.revision, mode, ref.commit)
        self.refresh()

    def all(self) -> list[tuple[RepoRef, RepoRef, str]]:
        """(held, now, mode) of every pin whose revision the index can name a commit for."""
        out = []
        for repo_type, repo_id, revision, mode, held in self.index.pins.all():
            now = self.index.refs.commit_of(repo_type, repo_id, revision)
            if held or now:
                ref = RepoRef(repo_type, repo_id, revision, held or now)
                out.append((ref, ref if not now else RepoRef(repo_type, repo_id, revision, now), mode))
        return out

    def besides(self, ref: RepoRef) -> dict[str, int]:
        """{blob id: size} of what the pins other than that of `ref`'s revision keep (a pin about to
        move lets go only what no other pin keeps): O(pinned files), as a refresh is."""
        return self._kept(skip=(ref.repo_type, ref.repo_id, ref.revision))[0]

    def refresh(self) -> None:
        """Recompute the pinned and hot sets; a pin written before pins held a commit takes the one
        its revision names now (without, it would follow its branch wherever it went)."""
        for repo_type, repo_id, revision, mode, held in self.index.pins.all():
            if held is None and (now := self.index.refs.commit_of(repo_type, repo_id, revision)):
                self.index.pins.put(repo_type, repo_id, revision, mode, now)
        sizes, hot = self._kept()
        self.in_use.pin(sizes)
        self.hot.clear()
        self.hot.update(hot)

    def _kept(self, skip: tuple[str, str, str] | None = None) -> tuple[dict[str, int], set[str]]:
        sizes: dict[str, int] = {}
        hot: set[str] = set()
        for ref, mode in self.refs():
            if (ref.repo_type, ref.repo_id, ref.revision) == skip:
                continue
            files = self.index.snapshots.get(ref.repo_type, ref.repo_id, ref.commit) or []
            sizes.update((f.blob_id, f.size) for f in files)
            if mode == "hot":
                hot.update(f.blob_id for f in files)
        return sizes, hot
