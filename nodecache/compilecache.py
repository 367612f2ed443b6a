"""Compile caches on this node's disk: one writable directory per key, sealed into snapshots, filled from peers.

Layout under `<cache_dir>/compile-caches/`:
  keys/<name>/meta.json    the key's text, times, the CSI targets that use it
  keys/<name>/tree/        the directory pods write into (bound read-write by the CSI plugin)
  keys/<name>/sealed.json  the newest snapshot of the tree (a manifest, see ccmanifest)
  blobs/<sha256>           file contents of sealed snapshots, one copy per content
  tmp/                     staging; emptied at start

Snapshots travel between nodes (ccpeers: small blobs in batches, see
ccframes) and, with `compile_cache_upstream`, through a bucket (ccupstream):
a node uploads what it sealed itself; a publish takes the newest snapshot of
its peers and the bucket, whichever is newer.

Pods own `tree/` and may put anything there, so it is walked through directory
fds, never following a symlink, and only regular files, directories and
symlinks that stay inside the tree are sealed. A bad meta.json or sealed.json
is logged and left out; it never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from . import ccframes as cf
from . import ccmanifest as cm
from .backoff import delays
from .ccmanifest import BadManifest, Entry, Manifest
from .ccpeers import PeerSnapshots
from .ccupstream import S3Snapshots, UpstreamFailed
from .config import Config
from .metrics import Metrics

log = logging.getLogger(__name__)

BUF = 1 << 20
FETCHES = 8  # batch requests (and big-blob streams) in flight during one fill


class InUse(Exception):
    """The key is published to a pod: it is not evicted."""


@dataclass
class Key:
    key: str
    name: str
    created: float
    last_used: float
    users: set[str] = field(default_factory=set)  # CSI target paths
    bytes: int = 0
    files: int = 0
    fingerprint: str = ""  # of the tree as last walked
    newest_mtime: float = 0.0
    sealed: Manifest | None = None
    sealed_fingerprint: str = ""  # the tree's fingerprint when it was sealed or filled
    stats: dict = field(default_factory=dict)  # path -> (size, mtime_ns, ino, sha256) at the last seal
    uploaded: str = ""  # id of the last snapshot of ours written to the upstream

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "name": self.name,
            "bytes": self.bytes,
            "files": self.files,
            "in_use": len(self.users),
            "created": self.created,
            "last_used": self.last_used,
            "sealed": None
            if self.sealed is None
            else {
                "id": self.sealed.id,
                "at": self.sealed.sealed_at,
                "node": self.sealed.node,
                "files": self.sealed.files,
                "uploaded": self.uploaded == self.sealed.id,
            },
            "dirty": self.fingerprint != self.sealed_fingerprint,
        }


# -- walking a tree pods control -------------------------------------------------


@dataclass
class Walk:
    entries: list[tuple[str, str, os.stat_result, str]]  # (path, type, lstat, symlink target)
    skipped: int = 0

    def fingerprint(self) -> tuple[str, float, int, int]:
        h = hashlib.sha256()
        newest, total, files = 0.0, 0, 0
        for path, kind, st, target in self.entries:
            h.update(f"{path}\0{kind}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{target}\n".encode())
            newest = max(newest, st.st_mtime)
            if kind == "file":
                total += st.st_size
                files += 1
        return h.hexdigest(), newest, total, files


def walk(root: Path) -> Walk:
    """Every dir, regular file and in-tree symlink under root, by dir fd (no symlink is ever followed)."""
    out = Walk([])
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    out.entries.append(("", "dir", os.fstat(top), ""))
    stack = [(top, "")]
    try:
        while stack:
            fd, rel = stack.pop()
            try:
                with os.scandir(fd) as it:
                    names = sorted(e.name for e in it)
                for name in names:
                    path = f"{rel}/{name}" if rel else name
                    try:
                        path.encode("utf-8")
                        cm.check_path(path)
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except (UnicodeEncodeError, BadManifest, OSError):
                        out.skipped += 1
                        continue
                    if len(out.entries) >= cm.MAX_ENTRIES:
                        raise BadManifest(f"more than {cm.MAX_ENTRIES} entries in the tree")
                    if stat.S_ISDIR(st.st_mode):
                        try:
                            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                        except OSError:
                            out.skipped += 1
                            continue
                        out.entries.append((path, "dir", st, ""))
                        stack.append((sub, path))
                    elif stat.S_ISREG(st.st_mode) and st.st_size <= cm.MAX_FILE:
                        out.entries.append((path, "file", st, ""))
                    elif stat.S_ISLNK(st.st_mode):
                        try:
                            target = cm.check_target(path, os.readlink(name, dir_fd=fd))
                        except (BadManifest, OSError):
                            out.skipped += 1  # a link out of the tree is never sealed
                            continue
                        out.entries.append((path, "symlink", st, target))
                    else:
                        out.skipped += 1  # fifos, sockets, devices, huge files
            finally:
                os.close(fd)
    except BaseException:
        for fd, _ in stack:
            os.close(fd)
        raise
    out.entries.sort(key=lambda e: e[0])
    return out


def _open_in(root: Path, path: str) -> int:
    """Open a regular file under root, component by component, following no symlink."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        parts = path.split("/")
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


# -- the node's compile caches -----------------------------------------------------

BlobFetch = Callable[[str, int, Path, list[str]], Awaitable[bool]]


class CompileCaches:
    """Every compile-cache key of this node: publish (acquire/release), quota, seal, fill."""

    def __init__(
        self,
        root: Path,
        node: str,
        max_bytes: int = 0,
        seal_after: float = 60.0,
        fill_timeout: float = 60.0,
        peers=None,
        on_invalid: Callable[[str], None] | None = None,
        on_event: Callable[[str], None] | None = None,
        upstream: S3Snapshots | None = None,
    ):
        self.root = root
        self.node = node
        self.max_bytes = max_bytes
        self.seal_after = seal_after
        self.fill_timeout = fill_timeout
        self.peers = peers  # ccpeers.PeerSnapshots, or None without peers
        self.upstream = upstream  # ccupstream.S3Snapshots, or None without compile_cache_upstream
        self._uploads: dict[str, asyncio.Task] = {}
        self._fetching: dict[str, set[str]] = {}  # key name -> blobs of the snapshot being filled (kept by gc)
        self._upload_retry: dict[str, tuple[float, object]] = {}  # name -> (not before, delays iterator)
        self.on_invalid = on_invalid or (lambda what: None)
        self.keys: dict[str, Key] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.on_event = on_event or (lambda event: None)  # seal, fill, fill_timeout, fill_failed, eviction, upload
        for sub in ("keys", "blobs", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "tmp", ignore_errors=True)
        (root / "tmp").mkdir(exist_ok=True)
        self._load()

    # -- state on disk -------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.root / "keys" / name

    def tree(self, name: str) -> Path:
        return self._dir(name) / "tree"

    def _load(self) -> None:
        for d in sorted((self.root / "keys").iterdir()):
            if not cm.NAME_RE.fullmatch(d.name) or d.is_symlink() or not d.is_dir():
                log.warning("compile caches: ignoring %s (not a key directory)", d)
                self.on_invalid("key_dir")
                continue
            try:
                meta = json.loads((d / "meta.json").read_bytes())
                key = cm.check_key(meta["key"])
                if cm.key_name(key) != d.name:
                    raise ValueError("its key does not hash to its name")
                users = meta.get("users", [])
                if not isinstance(users, list) or not all(isinstance(u, str) and u.startswith("/") for u in users):
                    raise ValueError("users must be a list of absolute paths")
                k = Key(key, d.name, float(meta["created"]), float(meta["last_used"]), set(users[:10_000]))
                k.uploaded = str(meta.get("uploaded", ""))[:64]
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                log.warning("compile caches: ignoring %s: bad meta.json (%s)", d, e)
                self.on_invalid("meta")
                continue
            sealed = d / "sealed.json"
            if sealed.exists():
                try:
                    k.sealed = cm.parse(sealed.read_bytes(), key)
                    k.sealed_fingerprint = str(meta.get("sealed_fingerprint", ""))
                except (OSError, BadManifest) as e:
                    log.warning("compile caches: %s: dropping its snapshot, bad sealed.json (%s)", key, e)
                    self.on_invalid("manifest")
                    sealed.unlink(missing_ok=True)
            self.tree(d.name).mkdir(exist_ok=True)
            self.keys[d.name] = k
        for k in self.keys.values():
            self._measure(k)

    def _save(self, k: Key) -> None:
        doc = {
            "key": k.key,
            "created": k.created,
            "last_used": k.last_used,
            "users": sorted(k.users),
            "sealed_fingerprint": k.sealed_fingerprint,
            "uploaded": k.uploaded,
        }
        tmp = self._dir(k.name) / "meta.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self._dir(k.name) / "meta.json")

    def _measure(self, k: Key) -> Walk | None:
        try:
            w = walk(self.tree(k.name))
        except (OSError, BadManifest) as e:
            log.warning("compile cache %s: cannot walk its tree: %s", k.key, e)
            return None
        k.fingerprint, k.newest_mtime, k.bytes, k.files = w.fingerprint()
        return w

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def find(self, key: str) -> Key | None:
        return self.keys.get(cm.key_name(key))

    # -- publish ---------------------------------------------------------------------

    async def acquire(self, key: str, target: str) -> tuple[Path, str]:
        """The key's tree for a pod at `target`; filled from the newest peer snapshot first if that is newer
        than what is here and nobody uses it (bounded by fill_timeout, else as it is). -> (tree, how)."""
        name = cm.key_name(key)
        if not target.startswith("/") or "\0" in target or len(target) > cm.MAX_PATH:
            raise ValueError("target must be an absolute path")
        async with self.lock(name):
            k = self.keys.get(name)
            how = "local"
            if k is None:
                now = time.time()
                k = Key(key, name, now, now)
                self.tree(name).mkdir(parents=True, exist_ok=True)
                os.chmod(self.tree(name), 0o777)  # pods may run as any uid
                self.keys[name] = k
                self._save(k)
                how = "empty"
            if not k.users and (self.peers is not None or self.upstream is not None):  # in use: never swapped
                try:  # the wait bounds finding and fetching; building the tree is local and always finishes
                    fetched = await asyncio.wait_for(self._fetch_newest(k), self.fill_timeout)
                    if fetched is not None:
                        await self._install(k, *fetched)
                        how = fetched[1]
                except TimeoutError:
                    log.warning("compile cache %s: no fill within %.0fs; published as it is", key, self.fill_timeout)
                    self.on_event("fill_timeout")
                except (OSError, BadManifest) as e:
                    log.warning("compile cache %s: fill failed (%s); published as it is", key, e)
                    self.on_event("fill_failed")
                finally:
                    self._fetching.pop(name, None)
            k.users.add(target)
            k.last_used = time.time()
            self._save(k)
            return self.tree(name), how

    def adopt(self, name: str, target: str) -> str:
        """Record `target` as a user of the key named `name` (its hashed directory), as the CSI plugin sees
        it bound: no fill, no swap. For binds the daemon forgot (its state lost or restored). -> the key."""
        if not cm.NAME_RE.fullmatch(name) or name not in self.keys:
            raise KeyError(f"no compile cache named {name!r} on this node")
        if not target.startswith("/") or "\0" in target or len(target) > cm.MAX_PATH:
            raise ValueError("target must be an absolute path")
        k = self.keys[name]
        if target not in k.users:
            k.users.add(target)
            k.last_used = time.time()
            self._save(k)
            log.info("compile cache %s: %s is bound to it (told by the CSI plugin)", k.key, target)
        return k.key

    def users(self) -> dict[str, str]:
        """target -> key name, for every target some key believes uses it."""
        return {t: k.name for k in self.keys.values() for t in k.users}

    def release(self, target: str) -> list[str]:
        """Forget `target` as a user of whichever key had it; the keys it used."""
        out = []
        for k in self.keys.values():
            if target in k.users:
                k.users.discard(target)
                k.last_used = time.time()
                self._save(k)
                out.append(k.key)
        return out

    # -- space -----------------------------------------------------------------------

    def evict(self, key: str) -> int:
        name = cm.key_name(key)
        k = self.keys.get(name)
        if k is None:
            raise KeyError(f"no compile cache {key!r} on this node")
        if k.users:
            raise InUse(f"compile cache {key!r} is published to {len(k.users)} volume(s)")
        freed = k.bytes
        del self.keys[name]
        trash = self.root / "tmp" / f"evict-{name}-{time.monotonic_ns()}"
        os.replace(self._dir(name), trash)
        shutil.rmtree(trash, ignore_errors=True)
        self.on_event("eviction")
        self.gc_blobs()
        log.info("compile cache %s evicted (%d bytes)", key, freed)
        return freed

    def blob_bytes(self) -> int:
        total = 0
        with os.scandir(self.root / "blobs") as it:
            for e in it:
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_size
        return total

    def used(self) -> int:
        return sum(k.bytes for k in self.keys.values()) + self.blob_bytes()

    def enforce_quota(self) -> list[str]:
        """Evict idle keys, least recently used first, until trees + blobs fit compile_cache_max."""
        if not self.max_bytes:
            return []
        out = []
        for k in sorted(self.keys.values(), key=lambda k: k.last_used):
            if self.used() <= self.max_bytes:
                break
            if k.users or self.lock(k.name).locked():
                continue
            self.evict(k.key)
            out.append(k.key)
        return out

    def gc_blobs(self) -> int:
        keep = set().union(*(k.sealed.blobs() for k in self.keys.values() if k.sealed), *self._fetching.values())
        n = 0
        with os.scandir(self.root / "blobs") as it:
            for e in it:
                if e.name not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
                        n += 1
        return n

    # -- sealing ---------------------------------------------------------------------

    def blob(self, sha: str) -> Path | None:
        if not cm.SHA256_RE.fullmatch(sha):
            return None
        p = self.root / "blobs" / sha
        return p if p.is_file() else None

    def _seal_sync(self, k: Key) -> Manifest:
        w = walk(self.tree(k.name))
        entries, stats = [], {}
        for path, kind, st, target in w.entries:
            if path == "":
                continue
            if kind == "dir":
                entries.append(Entry(path, "dir", stat.S_IMODE(st.st_mode) & 0o777))
            elif kind == "symlink":
                entries.append(Entry(path, "symlink", 0o777, target=target))
            else:
                sig = (st.st_size, st.st_mtime_ns, st.st_ino)
                prev = k.stats.get(path)
                if prev and prev[:3] == sig and self.blob(prev[3]):
                    sha, size = prev[3], st.st_size
                else:
                    try:
                        sha, size = self._copy_in(self.tree(k.name), path)
                    except OSError:
                        continue  # gone or replaced meanwhile: the next seal takes it
                stats[path] = (*sig, sha)
                entries.append(Entry(path, "file", stat.S_IMODE(st.st_mode) & 0o777, size, sha))
        m = Manifest(k.key, time.time(), self.node, cm.check_entries(entries))
        k.stats = stats
        k.fingerprint, k.newest_mtime, k.bytes, k.files = w.fingerprint()
        return m

    def _copy_in(self, root: Path, path: str) -> tuple[str, int]:
        """Copy one file of the tree into blobs/ while hashing it; the blob is what was hashed."""
        fd = _open_in(root, path)
        tmp = self.root / "tmp" / f"blob-{os.getpid()}-{time.monotonic_ns()}"
        h, size = hashlib.sha256(), 0
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
            with open(tmp, "wb") as out:
                while chunk := os.read(fd, BUF):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                    if size > cm.MAX_FILE:
                        raise OSError("file too large")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        sha = h.hexdigest()
        dest = self.root / "blobs" / sha
        if dest.exists():
            tmp.unlink()
        else:
            os.replace(tmp, dest)
        return sha, size

    def _publish_manifest(self, k: Key, m: Manifest) -> None:
        tmp = self._dir(k.name) / "sealed.json.tmp"
        tmp.write_bytes(m.dump())
        os.replace(tmp, self._dir(k.name) / "sealed.json")
        k.sealed = m
        k.sealed_fingerprint = k.fingerprint
        self._save(k)

    async def seal(self, key: str) -> Manifest:
        name = cm.key_name(key)
        k = self.keys.get(name)
        if k is None:
            raise KeyError(f"no compile cache {key!r} on this node")
        async with self.lock(name):
            m = await asyncio.to_thread(self._seal_sync, k)
            self._publish_manifest(k, m)
            self.gc_blobs()
            self.on_event("seal")
            log.info("compile cache %s sealed: %d files, %d bytes, %s", key, m.files, m.bytes, m.id[:12])
            return m

    async def tick(self) -> None:
        """Measure every tree; seal those changed since their last seal and quiet for seal_after; keep the quota."""
        now = time.time()
        for k in list(self.keys.values()):
            if self.lock(k.name).locked():
                continue
            await asyncio.to_thread(self._measure, k)
            if k.fingerprint != k.sealed_fingerprint and k.files and now - k.newest_mtime >= self.seal_after:
                try:
                    await self.seal(k.key)
                except (OSError, BadManifest) as e:
                    log.warning("compile cache %s: seal failed: %s", k.key, e)
            self._start_upload(k, now)
        self.enforce_quota()

    # -- the upstream -------------------------------------------------------------------

    def _start_upload(self, k: Key, now: float) -> None:
        """Upload a snapshot this node sealed itself, once, in the background (retried with backoff)."""
        m = k.sealed
        if self.upstream is None or m is None or m.node != self.node or k.uploaded == m.id:
            return
        if k.name in self._uploads or now < self._upload_retry.get(k.name, (0.0, None))[0]:
            return
        self._uploads[k.name] = asyncio.get_running_loop().create_task(self._upload(k, m))

    async def _upload(self, k: Key, m: Manifest) -> None:
        try:
            n = await self.upstream.publish(m, self.blob)
        except (UpstreamFailed, OSError) as e:
            retry = self._upload_retry.get(k.name, (0.0, delays(5.0, 300.0)))[1]
            wait = next(retry)
            self._upload_retry[k.name] = (time.time() + wait, retry)
            log.warning("compile cache %s: upload to %s failed (%s); again in %.0fs", k.key, self.upstream.url, e, wait)
            return
        finally:
            self._uploads.pop(k.name, None)
        self._upload_retry.pop(k.name, None)
        if self.keys.get(k.name) is k:
            k.uploaded = m.id
            self._save(k)
        self.on_event("upload")
        log.info("compile cache %s: snapshot %s uploaded to %s (%d new blobs)", k.key, m.id[:12], self.upstream.url, n)

    async def close(self) -> None:
        for task in list(self._uploads.values()):
            task.cancel()
        if self._uploads:
            await asyncio.gather(*self._uploads.values(), return_exceptions=True)
        if self.upstream is not None:
            self.upstream.close()

    # -- filling from a snapshot -------------------------------------------------------

    async def _newest_upstream(self, key: str) -> Manifest | None:
        try:
            return await self.upstream.newest(key)
        except UpstreamFailed as e:
            log.warning("compile cache %s: %s", key, e)
            return None

    async def _fetch_newest(self, k: Key) -> tuple[Manifest, str, float] | None:
        """Fetch the blobs of the newest snapshot of the peers and the upstream if it is newer than ours and
        our tree is clean. -> (that snapshot, where it came from: peer|upstream, fetch seconds), or None."""
        peers, remote = await asyncio.gather(
            self.peers.newest(k.key) if self.peers is not None else asyncio.sleep(0),
            self._newest_upstream(k.key) if self.upstream is not None else asyncio.sleep(0),
        )
        best, source = (peers[0], peers[1]) if peers else (None, None)
        if remote is not None and remote.newer_than(best):
            best, source = remote, self.upstream
        if best is None or not best.newer_than(k.sealed):
            return None
        await asyncio.to_thread(self._measure, k)
        if k.files and k.fingerprint != k.sealed_fingerprint:
            log.info("compile cache %s: local writes not sealed yet; keeping them over %s", k.key, best.id[:12])
            return None
        t0 = time.monotonic()
        self._fetching[k.name] = best.blobs()
        await self.fetch(k, best, source)
        return best, source.name, time.monotonic() - t0

    async def fetch(self, k: Key, m: Manifest, source) -> None:
        """Fetch the snapshot's missing blobs from `source` into blobs/: small ones in batches, big ones
        streamed, each verified; the first failure cancels the rest and is raised."""
        missing = {e.sha256: e.size for e in m.entries if e.type == "file" and self.blob(e.sha256) is None}
        small = [(sha, n) for sha, n in missing.items() if n <= cf.SMALL]
        big = [(sha, n) for sha, n in missing.items() if n > cf.SMALL]
        sem = asyncio.Semaphore(FETCHES)

        async def batch(i: int, items: list[tuple[str, int]]) -> None:
            async with sem:
                got = await source.fetch_small(items, i)
                await asyncio.to_thread(self._put_blobs, got)
            if len(got) < len(items):
                raise OSError(f"{len(items) - len(got)} blob(s) of {k.key!r}: no {source.name} served them intact")

        async def one(sha: str, size: int) -> None:
            async with sem:
                dest = self.root / "tmp" / f"fetch-{sha}-{time.monotonic_ns()}"
                try:
                    if not await source.fetch_blob(sha, size, dest):
                        raise OSError(f"blob {sha} of {k.key!r}: no {source.name} served it intact")
                    os.replace(dest, self.root / "blobs" / sha)
                finally:
                    dest.unlink(missing_ok=True)

        tasks = [batch(i, items) for i, items in enumerate(cf.batches(small))] + [one(s, n) for s, n in big]
        try:
            async with asyncio.TaskGroup() as group:
                for t in tasks:
                    group.create_task(t)
        except BaseExceptionGroup as eg:  # the first failure says why; the others were cancelled
            raise eg.exceptions[0] from None

    async def _install(self, k: Key, m: Manifest, source: str, fetch_s: float) -> None:
        """Build the snapshot's tree beside the old one and swap it in (its blobs are all here)."""
        t0 = time.monotonic()
        await asyncio.to_thread(self._materialize, k, m)
        await asyncio.to_thread(self._measure, k)
        self._publish_manifest(k, m)
        self.on_event("fill")
        log.info(
            "compile cache %s filled from %s: %d files, %d bytes, %s; fetch %.2fs, build %.2fs",
            k.key, source, m.files, m.bytes, m.id[:12], fetch_s, time.monotonic() - t0,
        )  # fmt: skip

    def _put_blobs(self, blobs: dict[str, bytes]) -> None:
        """Verified blobs into blobs/ (each written aside, then renamed: a blob is whole or absent)."""
        for sha, data in blobs.items():
            tmp = self.root / "tmp" / f"put-{sha}-{time.monotonic_ns()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / "blobs" / sha)

    def _materialize(self, k: Key, m: Manifest) -> None:
        stage = self.root / "tmp" / f"stage-{k.name}-{time.monotonic_ns()}"
        stage.mkdir(mode=0o700)
        try:
            for e in m.entries:  # parents come first (check_entries)
                p = stage / e.path
                if e.type == "dir":
                    p.mkdir()
                elif e.type == "symlink":
                    os.symlink(e.target, p)
                else:
                    src = self.blob(e.sha256)
                    if src is None:
                        raise OSError(f"blob {e.sha256} missing")
                    shutil.copyfile(src, p)
                    os.chmod(p, e.mode)
            for e in reversed(m.entries):
                if e.type == "dir":
                    os.chmod(stage / e.path, e.mode)
            os.chmod(stage, 0o777)
            old = self.root / "tmp" / f"old-{k.name}-{time.monotonic_ns()}"
            os.replace(self.tree(k.name), old)
            os.replace(stage, self.tree(k.name))
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise

    def listing(self) -> list[dict]:
        return sorted((k.as_dict() for k in self.keys.values()), key=lambda d: -d["last_used"])


def node_compile_caches(
    cfg: Config, m: Metrics, session: aiohttp.ClientSession, live: Callable[[], list[str]], with_peers: bool
) -> CompileCaches:
    """A node's compile caches from its config, shared with its peers as sealed snapshots if it has any."""
    peers = upstream = None
    if with_peers:
        verify = m.verify_failures.labels("compile_cache_peer").inc
        peers = PeerSnapshots(session, cfg.cluster_token, live, cfg.me, cfg.peer_timeout, verify)
    if cfg.compile_cache_upstream:
        upstream = S3Snapshots(
            cfg.compile_cache_upstream,
            endpoint_url=cfg.s3_endpoint_url,
            region=cfg.s3_region,
            path_style=cfg.s3_path_style,
            on_verify_failure=m.verify_failures.labels("compile_cache_upstream").inc,
        )
    return CompileCaches(
        cfg.cache_dir / "compile-caches",
        cfg.me,
        cfg.compile_cache_max,
        cfg.compile_cache_seal_after,
        cfg.compile_cache_fill_timeout,
        peers,
        on_invalid=lambda what: m.index_invalid.labels("compile_cache_" + what).inc(),
        on_event=lambda event: m.compile_cache_events.labels(event).inc(),
        upstream=upstream,
    )
