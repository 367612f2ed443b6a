"""Which commit a mirror request reads and which files it lists: resolved once, then remembered briefly."""

from __future__ import annotations

import asyncio
import time

from ..catalog import Catalog
from ..config import Config
from ..index import Index
from ..layout import COMMIT_RE, FileEntry
from ..repos import RepoRef
from ..upstream import NotFound, UpstreamError
from .errors import HubError
from .paths import Target

REF_TTL = 30.0  # a branch/tag -> commit answer is reused this long (commits: forever)
REFS_MAX = 4096  # remembered revision -> commit answers
FILE_LISTS_MAX = 256  # remembered snapshot listings


class Snapshots:
    """Revision -> commit through the catalog (index + FUSE tree), and a snapshot's files by path."""

    def __init__(self, cfg: Config, catalog: Catalog, index: Index):
        self.cfg, self.catalog, self.index = cfg, catalog, index
        self._refs: dict[tuple[str, str, str], tuple[RepoRef, float]] = {}
        self._resolving: dict[tuple[str, str, str, bool], asyncio.Task] = {}
        self._files: dict[tuple[str, str, str], dict[str, FileEntry]] = {}

    async def resolve(self, t: Target, public_only: bool = False) -> RepoRef:
        """Revision -> commit through Catalog.add_repo (index + FUSE tree), one call per key at a time."""
        hit = self._refs.get((t.repo_type, t.repo_id, t.revision))
        if hit and hit[1] > time.monotonic():
            return hit[0]
        key = (t.repo_type, t.repo_id, t.revision, public_only)
        task = self._resolving.get(key)
        if task is None:
            task = self._resolving[key] = asyncio.get_running_loop().create_task(self._add_repo(t, public_only))
            task.add_done_callback(lambda _: self._resolving.pop(key, None))
        try:
            return await asyncio.shield(task)
        except NotFound as e:
            code = "RevisionNotFound" if "revision" in str(e) else "RepoNotFound"
            raise HubError(404, str(e), code) from None
        except UpstreamError as e:
            raise HubError(504, f"upstream unreachable and {t.spec} not cached: {e}") from None

    async def _add_repo(self, t: Target, public_only: bool) -> RepoRef:
        ref, _, _ = await self.catalog.add_repo(t.spec, public_only=public_only)
        ttl = float("inf") if COMMIT_RE.fullmatch(t.revision) else min(REF_TTL, self.cfg.ref_ttl)
        if len(self._refs) >= REFS_MAX:
            self._refs.clear()
        self._refs[(t.repo_type, t.repo_id, t.revision)] = (ref, time.monotonic() + ttl)
        return ref

    def files(self, ref: RepoRef) -> dict[str, FileEntry]:
        key = (ref.repo_type, ref.repo_id, ref.commit)
        files = self._files.get(key)
        if files is None:
            listed = self.index.snapshots.get(ref.repo_type, ref.repo_id, ref.commit)
            if listed is None:
                raise HubError(504, f"snapshot {ref.commit} of {ref.repo_id} is not in the index")
            if len(self._files) > FILE_LISTS_MAX:
                self._files.clear()
            files = self._files[key] = {f.path: f for f in listed}
        return files
