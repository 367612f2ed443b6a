"""The node's durable memory: refs, snapshots, blobs and chunk presence in LMDB.

After a restart the index is the truth. One environment holds a family of tables per kind of
record, each family its own class (records and keys are pure):
- `refs`, `repo_meta`, `pins` (refs.py): what is recorded per repo;
- `snapshots` (snapshots.py): file lists, with their folders and blobs as blocks;
- `blobs`, `verify_first` (blobs.py) and `chunks` (chunks.py): blob records and chunks on disk;
- `counts` (counts.py): what the blob records imply (state counts, proof and LRU orders);
- `links` (links.py): which snapshots list each blob (readiness, per-repo and per-snapshot bytes);
- `meta` (meta.py): records about the index itself.
`Index` opens them on one environment, so a change that spans families is one transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..layout import RepoView
from .blobs import Blobs, VerifyFirst
from .chunks import Chunks
from .counts import Counts
from .db import Db
from .links import Links
from .meta import Meta
from .records import BlobRecord, check_blob
from .refs import Pins, Refs, RepoMeta
from .snapshots import Snapshots

__all__ = ["BlobRecord", "Index", "check_blob"]

# The derived tables (counts, links) are built once for an index written before they existed
# (v3: the links carry the blob's size, and replace v2's separate `blob_repos`; v4: per-snapshot
# counts).
_DERIVED = "derived_v4"


class Index:
    """The families of tables on one LMDB environment."""

    def __init__(self, path: Path, map_size: int = 1 << 36, on_invalid: Callable[[str], None] = lambda db: None):
        """`on_invalid(table)` hears of each entry that failed its check on load (and was dropped)."""
        self.db = Db(path, map_size, on_invalid)
        self.env = self.db.env
        self.meta = Meta(self.db)
        self.links = Links(self.db)
        self.counts = Counts(self.db, self.meta, self.links)
        self.blobs = Blobs(self.db, self.counts)
        self.chunks = Chunks(self.db, self.counts)
        self.verify_first = VerifyFirst(self.db)
        self.snapshots = Snapshots(self.db, self.links)
        self.refs = Refs(self.db, self.links)
        self.repo_meta = RepoMeta(self.db)
        self.pins = Pins(self.db)
        self._derive_once()

    def close(self) -> None:
        self.db.close()

    def check_all(self) -> None:
        """Check every record (dropping the bad ones) and derive everything again: someone
        else wrote to the index, and may not have kept what the writes here keep."""
        self.blobs.all()
        self._derive_once(force=True)

    def _derive_once(self, force: bool = False) -> None:
        """Build the derived tables for an index written before they existed; later writes keep them."""
        if self.meta.get(_DERIVED) is not None and not force:
            return  # no write transaction: it would look like a write since a clean stop
        with self.db.write() as txn:
            if force or self.meta.get_in(txn, _DERIVED) is None:
                self.chunks.rebuild(txn)
                self.links.clear(txn)
                self.counts.rebuild(txn)  # the complete set, before the links count it
                self.snapshots.relist(txn)
                self.meta.put_in(txn, _DERIVED, 1)

    def views(self) -> list[RepoView]:
        """Every repo with its refs and snapshots, for building the FUSE tree."""
        found = {repo: RepoView(*repo, {}, snaps) for repo, snaps in self.snapshots.all().items()}
        for repo_type, repo_id, revision, commit, _ in self.refs.all():
            view = found.setdefault((repo_type, repo_id), RepoView(repo_type, repo_id, {}, {}))
            view.refs[revision] = commit
        return [found[k] for k in sorted(found)]

    def view(self, repo_type: str, repo_id: str) -> RepoView | None:
        """One repo's refs and snapshots (its keys and file lists only; None: not in the index)."""
        refs = self.refs.of(repo_type, repo_id)
        snapshots = {}
        for commit in self.snapshots.commits(repo_type, repo_id):
            files = self.snapshots.get(repo_type, repo_id, commit)
            if files is not None:
                snapshots[commit] = files
        return RepoView(repo_type, repo_id, refs, snapshots) if refs or snapshots else None
