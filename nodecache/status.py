"""What a node reports: /v1/status, /v1/repos and the Prometheus gauges (the node labels: readiness.py).

Read-only over the collaborators it is given; `Serving` is the one piece of
state the daemon writes (whether the mount is up) and the faces read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import __version__
from .compilecache import CompileCaches
from .config import Config
from .fill import Filler
from .index import Index
from .jobs import Jobs
from .labels import label_key
from .metrics import Metrics
from .peers import Membership
from .pins import Pins
from .repos import RepoRef
from .store import Store


@dataclass
class Serving:
    """Written by the daemon, read by the faces: is the node serving, and how."""

    ready: bool = False
    passthrough: bool = False
    failing: dict[str, dict] = field(default_factory=dict)  # configured repos that did not resolve


@dataclass
class Status:
    cfg: Config
    serving: Serving
    index: Index
    store: Store
    filler: Filler
    jobs: Jobs
    pins: Pins
    membership: Membership
    has_peers: bool
    compile_caches: CompileCaches
    metrics: Metrics

    def repos(self) -> list[dict]:
        pins = self.pins.refs()
        partial = self._partial_by_snapshot()
        return [self._repo(*repo, pins, partial) for repo in self._repo_keys()]

    def repo(self, repo_type: str, repo_id: str) -> dict | None:
        """One repo's entry of repos(), from its own index entries only (the CSI plugin asks per publish)."""
        refs = self.index.refs.of(repo_type, repo_id)
        if not refs and not self.index.snapshots.has_repo(repo_type, repo_id):
            return None
        return self._repo(repo_type, repo_id, self.pins.refs(), self._partial_by_snapshot(), refs)

    def _repo_keys(self) -> list[tuple[str, str]]:
        """Every repo with a snapshot or a ref, from the keys alone."""
        found = set(self.index.snapshots.repos())
        found.update((repo_type, repo_id) for repo_type, repo_id, *_ in self.index.refs.all())
        return sorted(found)

    def _partial_by_snapshot(self) -> dict[tuple[str, str, str], int]:
        """(repo_type, repo_id, commit) -> bytes on disk of its partly stored blobs: the blobs with
        a chunk recorded (fills under way or stopped), not every blob the snapshots list."""
        out: dict[tuple[str, str, str], int] = {}
        for blob_id, cached in self.store.partial_bytes(self.index.counts.chunked_ids()).items():
            for snap in self.index.links.snapshots_of(blob_id):
                out[snap] = out.get(snap, 0) + cached
        return out

    def _repo(
        self,
        repo_type: str,
        repo_id: str,
        pinned: list,
        partial: dict[tuple[str, str, str], int],
        refs: dict[str, str] | None = None,
    ) -> dict:
        """A repo's figures from the counters the index keeps per snapshot: no file list read."""
        refs = self.index.refs.of(repo_type, repo_id) if refs is None else refs
        meta = self.index.repo_meta.get(repo_type, repo_id) or {}
        missing = self.index.links.snapshots_missing(repo_type, repo_id)
        snaps = []
        for commit, (files, _, total, done, at) in self.index.links.snapshot_counts(repo_type, repo_id).items():
            snaps.append(
                {
                    "commit": commit,
                    "revisions": sorted(r for r, c in refs.items() if c == commit),
                    "files": files,
                    "bytes_total": total,
                    "bytes_cached": done + partial.get((repo_type, repo_id, commit), 0),
                    "complete": missing.get(commit) == 0,
                    "last_access": at,
                }
            )
        return {
            "repo": repo_id,
            "repo_type": repo_type,
            "node_label": label_key(repo_type, repo_id),
            "visibility": meta.get("visibility", "unknown"),
            "refs": refs,
            "pinned": {r.revision: mode for r, mode in pinned if (r.repo_type, r.repo_id) == (repo_type, repo_id)},
            "snapshots": snaps,
        }

    def node(self) -> dict:
        quarantine = self.store.quarantine_usage()
        ready = self.serving.ready
        return {
            "version": __version__,
            "ready": ready,
            "mount": str(self.cfg.mount) if self.cfg.mount else None,
            "passthrough": bool(self.serving.passthrough and ready),
            "tiers": [
                {
                    "name": t.name,
                    "path": str(t.root),
                    "used": t.used,
                    "capacity": t.capacity(),
                    "fs_free": t.fs_free(),
                    "quarantine_files": quarantine[t.name][0],
                    "quarantine_bytes": quarantine[t.name][1],
                }
                for t in self.store.tiers.values()
            ],
            "fills_inflight": self.filler.inflight,
            "blobs_filling": self.filler.filling,
            "jobs": self.jobs.counts(),
            "blobs": self.blob_counts(),
            "pins": [
                {
                    "repo": r.repo_id,
                    "revision": r.revision,
                    "commit": r.commit,  # held: what is kept, and filled
                    "latest": now.commit,  # what the revision names now (another: not taken yet, or refused)
                    "mode": m,
                    "ready": self._complete(r),
                }
                for r, now, m in self.pins.all()
            ],
            "peers": self.membership.status() if self.has_peers else [],
            "repos_failing": self.serving.failing,
        }

    def _complete(self, ref: RepoRef) -> bool:
        """Truthful readiness: every blob of the snapshot stored and verified (counted by the
        index: no record read)."""
        return self.index.links.snapshots_missing(ref.repo_type, ref.repo_id).get(ref.commit) == 0

    def blob_counts(self) -> dict[str, int]:
        """Blob records per state, as the index keeps them counted (a scrape reads no record)."""
        return self.index.counts.blob_states()

    def update_gauges(self) -> None:
        m = self.metrics
        for state, n in self.blob_counts().items():
            m.blobs.labels(state).set(n)
        for t in self.store.tiers.values():
            m.cache_bytes.labels(t.name).set(t.used)
            m.cache_capacity_bytes.labels(t.name).set(t.capacity())
        for tier, (files, nbytes) in self.store.quarantine_usage().items():
            m.quarantine_files.labels(tier).set(files)
            m.quarantine_bytes.labels(tier).set(nbytes)
        healthy = sum(p["healthy"] for p in self.membership.status())
        m.peers.labels("healthy").set(healthy)
        m.peers.labels("failed").set(len(self.membership.members) - healthy)
        for state, n in self.jobs.counts().items():
            m.jobs.labels(state).set(n)
        cc = self.compile_caches
        m.compile_cache_bytes.set(cc.used())
        m.compile_caches.labels("in_use").set(sum(1 for k in cc.keys.values() if k.users))
        m.compile_caches.labels("idle").set(sum(1 for k in cc.keys.values() if not k.users))
        pins = self.pins.refs()
        partial = self._partial_by_snapshot() if pins else {}
        for ref, _ in pins:  # bounded cardinality: pinned repos only
            counts = self.index.links.snapshot_counts(ref.repo_type, ref.repo_id).get(ref.commit)
            _, _, total, done, _ = counts or (0, 0, 0, 0, 0.0)
            cached = done + partial.get((ref.repo_type, ref.repo_id, ref.commit), 0)
            ratio = cached / total if total else 1.0
            if not self._complete(ref):
                ratio = min(ratio, 0.999)  # 1 only once verified
            m.repo_cached_ratio.labels(ref.repo_id).set(ratio)
