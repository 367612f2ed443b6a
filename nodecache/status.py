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
from .layout import RepoView
from .metrics import Metrics
from .peers import Membership
from .pins import Pins
from .repos import RepoRef, snapshot_blobs
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
        return [self._repo(view, pins) for view in self.index.views()]

    def repo(self, repo_type: str, repo_id: str) -> dict | None:
        """One repo's entry of repos(), from its own index entries only (the CSI plugin asks per publish)."""
        view = self.index.view(repo_type, repo_id)
        return None if view is None else self._repo(view, self.pins.refs())

    def _repo(self, view: RepoView, pinned: list) -> dict:
        meta = self.index.repo_meta.get(view.repo_type, view.repo_id) or {}
        snaps = []
        for commit, files in view.snapshots.items():
            blobs = {f.blob_id: f.size for f in files}
            recs = [self.store.record(b) for b in blobs]
            snaps.append(
                {
                    "commit": commit,
                    "revisions": sorted(r for r, c in view.refs.items() if c == commit),
                    "files": len(files),
                    "bytes_total": sum(blobs.values()),
                    "bytes_cached": sum(self.store.cached_bytes(r) for r in recs if r),
                    "complete": all(r is not None and r.state == "complete" for r in recs),
                    "last_access": max((r.last_access for r in recs if r), default=0.0),
                }
            )
        return {
            "repo": view.repo_id,
            "repo_type": view.repo_type,
            "node_label": label_key(view.repo_type, view.repo_id),
            "visibility": meta.get("visibility", "unknown"),
            "refs": view.refs,
            "pinned": {
                r.revision: mode for r, mode in pinned if (r.repo_type, r.repo_id) == (view.repo_type, view.repo_id)
            },
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
                {"repo": r.repo_id, "revision": r.revision, "commit": r.commit, "mode": m, "ready": self._complete(r)}
                for r, m in self.pins.refs()
            ],
            "peers": self.membership.status() if self.has_peers else [],
            "repos_failing": self.serving.failing,
        }

    def _complete(self, ref: RepoRef) -> bool:
        """Truthful readiness: every blob of the snapshot stored and verified."""
        return all(self.filler.record(b).state == "complete" for b in snapshot_blobs(self.index, ref))

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
        for ref, _ in self.pins.refs():  # bounded cardinality: pinned repos only
            recs = [self.store.record(b) for b in dict.fromkeys(snapshot_blobs(self.index, ref))]
            total = sum(r.size for r in recs if r)
            cached = sum(self.store.cached_bytes(r) for r in recs if r)
            ratio = cached / total if total else 1.0
            if not all(r and r.state == "complete" for r in recs):
                ratio = min(ratio, 0.999)  # 1 only once verified
            m.repo_cached_ratio.labels(ref.repo_id).set(ratio)
