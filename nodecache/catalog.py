"""Which repos this node knows: resolving them into the index, one resolution per spec at a time.

A request that nobody configured (a lookup through the mount, a mirror call, a
peer) may make the node resolve a repo only if the policy allows it, and a repo
matched only by a wildcard must be public. After a resolution the tree is told
once per repo (`on_change`), and blobs under verify_before_serve names are marked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from . import layout
from .config import Config
from .expiring import ExpiringSet
from .fill import Filler
from .index import Index
from .layout import RepoSpec
from .policy import RepoPolicy
from .repos import Commits, RepoRef, ensure_repo
from .upstream import NotFound, UpstreamError
from .upstream.sources import Sources

log = logging.getLogger(__name__)


class Catalog:
    def __init__(
        self,
        cfg: Config,
        index: Index,
        sources: Sources,
        filler: Filler,
        policy: RepoPolicy,
        on_change: Callable[[str, str], None],
        index_as_left: bool = True,
    ):
        """`index_as_left`: nobody but this node wrote to the index since it last ran (Store.start
        is not "written"), so the verify-first set it keeps holds."""
        self.cfg, self.index, self.sources, self.filler, self.policy = cfg, index, sources, filler, policy
        self.on_change = on_change  # (repo_type, repo_id): the tree must show what the index now holds
        self._not_found = ExpiringSet(ttl=30.0, max_items=10_000)  # on-demand lookups that failed
        self._resolving: dict[tuple[RepoSpec, str], asyncio.Future] = {}  # (spec, kind) -> one resolution
        self._commits = Commits(index)  # resolutions' last writes, committed together
        self._load_verify_first(index_as_left)

    def _load_verify_first(self, index_as_left: bool) -> None:
        """The index keeps the verify-first blob ids with the patterns that chose them: a start
        reads that set, not every snapshot, unless verify_before_serve changed. A new snapshot's
        ids are written before the snapshot (repos.register), so a crash never leaves a snapshot
        whose ids are missing: a start after a kill -9 trusts the set too. After someone else
        wrote to the index every snapshot is read (and so checked, the bad ones dropped)."""
        patterns = list(self.cfg.verify_before_serve)
        if index_as_left and self.index.meta.get("verify_first_patterns") == patterns:
            self.filler.verify_first.update(self.index.verify_first.get())
            return
        ids: set[str] = set()
        for view in self.index.views():
            verify = self.cfg.verify_first_paths(view.repo_id)
            for files in view.snapshots.values():
                ids.update(f.blob_id for f in files if verify(f.path))
        self.index.verify_first.set(ids, replace=True)
        self.index.meta.put("verify_first_patterns", patterns)
        self.filler.verify_first.update(ids)

    def _verify_first(self, repo_id: str, files: list) -> None:
        """Blobs shown under a verify_before_serve name anywhere are read only once proven."""
        verify = self.cfg.verify_first_paths(repo_id)
        ids = {f.blob_id for f in files if verify(f.path)} - self.filler.verify_first
        if ids:
            self.index.verify_first.set(ids)
            self.filler.verify_first.update(ids)

    async def _ensure(self, spec: RepoSpec, accept=None) -> RepoRef:
        """Resolve into the index; a snapshot new to the index has its verify-first blobs noted
        (one already there had them noted when it came: a re-resolution reads no file list)."""

        def new(files: list) -> None:
            self._verify_first(spec.repo_id, [f.entry for f in files])

        return await ensure_repo(self.index, self.sources, self.cfg.chunk_size, spec, accept, new, self._commits)

    def indexed(self, spec: RepoSpec) -> bool:
        """Does the index hold the snapshot this spec names (a restart can show it at once)?"""
        commit = self.index.refs.commit_of(spec.repo_type, spec.repo_id, spec.rev)
        return commit is not None and commit in self.index.snapshots.commits(spec.repo_type, spec.repo_id)

    def may_fetch(self, repo_type: str, repo_id: str) -> bool:
        """May a request (a peer's, a lookup's) make this node resolve the repo upstream?"""
        return self.policy.allows(repo_type, repo_id) or self.index.snapshots.has_repo(repo_type, repo_id)

    async def add_repo(self, spec: RepoSpec, public_only: bool = False) -> tuple[RepoRef, dict[str, int], list[str]]:
        """Resolve a repo into the index and show it in the tree; (ref, blob id -> bytes, the blob id of each file).

        Concurrent calls for one spec share one resolution. `public_only`
        (requests nobody configured) refuses a repo the Hub does not call public.
        """
        ref = await self.ensure(spec, public_only)
        files = self.index.snapshots.get(ref.repo_type, ref.repo_id, ref.commit) or []
        return ref, {f.blob_id: f.size for f in files}, [f.blob_id for f in files]

    async def ensure(self, spec: RepoSpec, public_only: bool = False) -> RepoRef:
        """add_repo without reading the snapshot's file list (a re-resolution at start)."""
        key = (spec, "public" if public_only else "any")
        pending = self._resolving.get(key)
        if pending is None:
            pending = self._resolving[key] = asyncio.ensure_future(self._add_repo(spec, public_only))
            pending.add_done_callback(lambda _: self._resolving.pop(key, None))
        return await asyncio.shield(pending)

    async def close(self) -> None:
        """Cancel resolutions still running (their callers were cancelled; the index closes next)."""
        pending = list(self._resolving.values())
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._commits.close()  # a commit under way in its thread finishes before the index closes

    async def _add_repo(self, spec: RepoSpec, public_only: bool) -> RepoRef:
        def public(res) -> str:
            return "" if res.visibility == "public" else f"{res.visibility} repos are resolved only when named"

        ref = await self._ensure(spec, public if public_only else None)
        self.on_change(ref.repo_type, ref.repo_id)
        return ref

    async def refresh_refs(self) -> int:
        """Re-resolve refs older than ref_ttl; a new commit appears as a new snapshot
        beside the old one (which stays readable). The number of refs that moved."""
        changed = 0
        for repo_type, repo_id, revision, commit, at in self.index.refs.all():
            if time.time() - at < self.cfg.ref_ttl:
                continue
            try:
                spec = RepoSpec(repo_type, repo_id, revision)
                ref = await self._ensure(spec)
            except (UpstreamError, ValueError) as e:
                log.warning("cannot re-resolve %s@%s: %s", repo_id, revision, e)
                continue
            if ref.commit != commit:
                log.info("%s@%s moved %s -> %s", repo_id, revision, commit[:12], ref.commit[:12])
                changed += 1
                self.on_change(repo_type, repo_id)
        return changed

    async def resolve_on_demand(self, folder: str) -> bool:
        """A lookup of `models--org--name` nobody listed: resolve it if `on_demand` allows.

        Any process that sees the mount can look up any name, so a repo matched
        only by a wildcard must be public; private and gated ones must be named.
        """
        parsed = layout.parse_repo_folder(folder)
        if parsed is None or not self.policy.allows(*parsed) or folder in self._not_found:
            return False
        try:
            await self.add_repo(RepoSpec(*parsed), public_only=not self.policy.names(*parsed))
            return True
        except (NotFound, UpstreamError) as e:
            log.info("on-demand %s: %s", folder, e)
            self._not_found.add(folder)
            return False
