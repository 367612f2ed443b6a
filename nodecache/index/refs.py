"""What is recorded per repo besides its snapshots: refs (revision -> commit), what its source
said of it (visibility), and pins."""

from __future__ import annotations

import json
import time

from ..layout import COMMIT_RE, validate_revision
from ..lmdbscan import under
from .db import Db
from .keys import commit_of, repo_key, split_key
from .links import Links
from .records import BAD


class Refs:
    """revision -> commit per repo, with when it was resolved."""

    def __init__(self, db: Db, links: Links):
        self.db, self.links = db, links
        self.table = db.table("refs")

    def _drop(self, bad: list[tuple[bytes, Exception]]) -> None:
        self.db.drop_invalid("refs", self.table, bad)

    def put(self, repo_type: str, repo_id: str, revision: str, commit: str) -> None:
        with self.db.write() as txn:
            self.put_in(txn, repo_type, repo_id, revision, commit)

    def put_in(self, txn, repo_type: str, repo_id: str, revision: str, commit: str) -> None:
        """`put` in the caller's transaction (a resolution's writes are one)."""
        value = json.dumps({"commit": commit, "at": time.time()})
        repo = repo_key(repo_type, repo_id)
        old = txn.get(repo + revision.encode(), db=self.table)
        try:
            moved = old is None or commit_of(old) != commit
        except BAD:
            moved = True
        if moved:  # the repo's readiness is its refs' snapshots'
            self.links.changed_repo(txn, repo)
        txn.put(repo + revision.encode(), value.encode(), db=self.table)

    def get(self, repo_type: str, repo_id: str, revision: str) -> str | None:
        key = repo_key(repo_type, repo_id) + revision.encode()
        with self.db.read() as txn:
            raw = txn.get(key, db=self.table)
        try:
            return commit_of(raw) if raw else None
        except BAD as e:
            self._drop([(key, e)])
            return None

    def commit_of(self, repo_type: str, repo_id: str, revision: str) -> str | None:
        """The commit a revision names here: itself if it is one, else its recorded ref (None: unknown)."""
        return revision if COMMIT_RE.fullmatch(revision) else self.get(repo_type, repo_id, revision)

    def all(self) -> list[tuple[str, str, str, str, float]]:
        """(repo_type, repo_id, revision, commit, resolved_at) of every ref."""
        out, bad = [], []
        with self.db.read() as txn:
            for key, raw in txn.cursor(db=self.table):
                try:
                    repo_type, repo_id, revision = split_key(key)
                    at = json.loads(raw)["at"]
                    if type(at) not in (int, float):
                        raise ValueError(f"at {at!r}")
                    out.append((repo_type, repo_id, validate_revision(revision), commit_of(raw), at))
                except BAD as e:
                    bad.append((key, e))
        self._drop(bad)
        return out

    def of(self, repo_type: str, repo_id: str) -> dict[str, str]:
        """revision -> commit for one repo."""
        repo = repo_key(repo_type, repo_id)
        out, bad = {}, []
        with self.db.read() as txn:
            entries = list(under(txn, self.table, repo))
        for revision, raw in entries:
            try:
                out[validate_revision(revision.decode())] = commit_of(raw)
            except BAD as e:
                bad.append((repo + revision, e))
        self._drop(bad)
        return out


class RepoMeta:
    """What the repo's source said of it last time (survives a restart with the source down)."""

    def __init__(self, db: Db):
        self.db = db
        self.table = db.table("repos")

    def put(self, repo_type: str, repo_id: str, visibility: str) -> None:
        with self.db.write() as txn:
            self.put_in(txn, repo_type, repo_id, visibility)

    def put_in(self, txn, repo_type: str, repo_id: str, visibility: str) -> None:
        value = json.dumps({"visibility": visibility, "at": time.time()})
        txn.put(repo_key(repo_type, repo_id), value.encode(), db=self.table)

    def get(self, repo_type: str, repo_id: str) -> dict | None:
        key = repo_key(repo_type, repo_id)
        with self.db.read() as txn:
            raw = txn.get(key, db=self.table)
        if not raw:
            return None
        try:
            meta = json.loads(raw)
            if meta["visibility"] not in ("public", "gated", "private", "unknown"):
                raise ValueError(f"visibility {meta['visibility']!r}")
            return meta
        except BAD as e:
            self.db.drop_invalid("repos", self.table, [(key, e)])
            return None


class Pins:
    """Pinned revisions (`pin`: never evicted; `hot`: also in shm while it has room), by repo and
    revision, each with the commit it holds: the one its revision named when it was last taken
    (a branch that moves on to a revision the cache cannot hold leaves the pin where it was)."""

    def __init__(self, db: Db):
        self.db = db
        self.table = db.table("pins")

    def put(self, repo_type: str, repo_id: str, revision: str, mode: str, commit: str) -> None:
        value = json.dumps({"mode": mode, "at": time.time(), "commit": commit})
        with self.db.write() as txn:
            txn.put(repo_key(repo_type, repo_id) + revision.encode(), value.encode(), db=self.table)

    def delete(self, repo_type: str, repo_id: str, revision: str) -> bool:
        with self.db.write() as txn:
            return txn.delete(repo_key(repo_type, repo_id) + revision.encode(), db=self.table)

    def all(self) -> list[tuple[str, str, str, str, str | None]]:
        """(repo_type, repo_id, revision, mode, commit held) of every pin (commit None: a pin
        written before pins held one, which holds what its revision names)."""
        out, bad = [], []
        with self.db.read() as txn:
            for key, raw in txn.cursor(db=self.table):
                try:
                    repo_type, repo_id, revision = split_key(key)
                    value = json.loads(raw)
                    mode, commit = value["mode"], value.get("commit")
                    if mode not in ("pin", "hot"):
                        raise ValueError(f"mode {mode!r}")
                    if commit is not None and not (isinstance(commit, str) and COMMIT_RE.fullmatch(commit)):
                        raise ValueError(f"commit {commit!r}")
                    out.append((repo_type, repo_id, validate_revision(revision), mode, commit))
                except BAD as e:
                    bad.append((key, e))
        self.db.drop_invalid("pins", self.table, bad)
        return out
