"""The FUSE face: a read-only HF hub cache tree, bytes through the one fill path.

Handlers run on the daemon's asyncio loop (`fusesession` calls them). Every
handler is wrapped so that any failure becomes a counted errno.

A blob that is complete and verified is opened in passthrough mode where the
kernel allows it: reads then go straight to the store file, so a cached model
loads at local-disk speed with one page-cache copy and the daemon idle. A blob
still filling is served by `read()` through the fill path, with keep_cache.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping

from .fill import Filler, FillError
from .folders import Block
from .fuseproto import ENOATTR, FATTR_FH, FATTR_KILL_SUIDGID, FATTR_LOCKOWNER, FATTR_MODE, FATTR_SIZE, FATTR_TIMES, Attr
from .fusesession import SLICE_MIN, FuseError, Opened
from .inodes import InodeTable
from .layout import BLOB_ID_RE, MAX_NAME, InvalidName, Node, Table, parse_repo_folder, repo_folder_name
from .metrics import Metrics
from .snapplan import opened_in
from .tree import HubTree

log = logging.getLogger(__name__)

XATTR_CACHED = b"user.nodecache.cached"
_LONG = 86400.0  # what never changes under a name (see `_lasting`): the kernel may keep it a day
_SHORT = 1.0  # refs/ and .locks/ do (a ref is also invalidated explicitly when it moves)
ROOT_INODE = 1
_TABLES_KEPT = 8  # folders' tables kept by the FUSE face (a blobs/ table of 10^6 blobs holds ~45 MB)
_ENTRIES_KEPT = 1024  # snapshot entries kept by number
MAX_LOCK_FILES = 10_000  # in-memory lock files under .locks/: a bound, not a store
_LOCKS = "hub/.locks"
# A file handle says what a read needs without a table: the next daemon serves handles this one opened.
_FH_SERIAL_BITS = 20
_FH_KIND_BITS = 4
_FH_INO_SHIFT = _FH_SERIAL_BITS + _FH_KIND_BITS
READ, LOCK, REWRITE = 0, 1, 2  # handle kinds


def _is_ref(path: str) -> bool:
    """`hub/<repo folder>/refs/...`: the files an old client rewrites."""
    parts = path.split("/", 3)
    return len(parts) == 4 and parts[0] == "hub" and parts[2] == "refs"


def _guard(op: str):
    """Count the request and turn every exception into a FUSE errno."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(self: NodecacheFS, *args):
            counted = self._counted.get(op)
            if counted is None:
                counted = self._counted[op] = self.metrics.fuse_requests.labels(op)
            counted.inc()
            try:
                return await fn(self, *args)
            except FuseError as e:
                if e.errno != errno.ENOENT:
                    self.metrics.fuse_errors.labels(errno.errorcode.get(e.errno, str(e.errno))).inc()
                raise
            except (InvalidName, KeyError, UnicodeDecodeError):
                raise FuseError(errno.ENOENT) from None
            except FillError as e:
                log.error("%s: %s", op, e)
                self.metrics.fuse_errors.labels(errno.errorcode.get(e.errno, "EIO")).inc()
                raise FuseError(e.errno) from None
            except Exception:
                log.exception("%s%r failed", op, args[:2])
                self.metrics.fuse_errors.labels("EIO").inc()
                raise FuseError(errno.EIO) from None

        return handler

    return wrap


def fh_ino(fh: int) -> int:
    return fh >> _FH_INO_SHIFT


def fh_kind(fh: int) -> int:
    return (fh >> _FH_SERIAL_BITS) & ((1 << _FH_KIND_BITS) - 1)


class NodecacheFS:
    """Inodes are assigned per path on first lookup (by `table`, which outlives this daemon)
    and stay stable across tree swaps and restarts. A file handle is its inode, its kind and
    a serial: a handle another daemon opened is served as well as our own."""

    def __init__(
        self,
        tree: HubTree,
        filler: Filler,
        metrics: Metrics,
        table: InodeTable,
        fill_on_open: bool = True,
        on_demand: Callable[[str], Awaitable[bool]] | None = None,
        ranges: bool = True,
    ):
        self.filler = filler
        self.metrics = metrics
        self.fill_on_open = fill_on_open
        self.table = table
        self.ranges = ranges  # number snapshot entries and blobs by ranges (state format 3; else per path)
        self._time_ns = time.time_ns()
        self._handles: dict[int, Node] = {}  # open handles this daemon knows (and holds the blob of)
        self._generation: dict[int, int] = {}  # fh -> its blob's generation at open (see Filler.read)
        # Handles opened on a complete blob (the daemon serves them: no passthrough): their reads go
        # through the blob file's page cache, warm for the next reader. A handle opened while its
        # blob fills reads around it (O_DIRECT): the kernel keeps the bytes in the mount's cache.
        self._paged: set[int] = set()
        self._next_fh = int.from_bytes(os.urandom(3)) % (1 << _FH_SERIAL_BITS)  # apart from the last daemon's
        self._rewrites: dict[int, bytearray] = {}  # fh of a ref opened for writing -> which bytes were rewritten
        self._locks = 0  # lock files held in memory
        self.tree = tree
        self.root = tree.root
        # Kept until a repo changes (both describe the tree as shown): the tables of the last
        # folders of snapshots (and blobs/) used, else made from their blocks on every request,
        # and the last entries of snapshots resolved by number (a walk asks READLINK, then GETATTR).
        # The blocks they hold may be ones the tree's cache dropped: together at most the bytes of
        # that cache, or the one they use now if it is bigger (the tree does not keep that one).
        kept = tree.blocks.max_bytes // 2
        self._tables = _Kept(_TABLES_KEPT, kept, lambda t: t.block.nbytes())
        self._entries: dict[int, tuple[str, Node]] = {}
        self._commit_blobs = _Kept(  # repo folder -> its snapshots' blob lists
            _TABLES_KEPT, kept, lambda blobs: sum(b.nbytes() for _, b in blobs)
        )
        self._counted: dict[str, object] = {}  # op -> its request counter (labels() costs a lock and a lookup)
        self.on_demand = on_demand  # async (folder name) -> bool: resolve an unknown repo upstream

    def repo_changed(self, repo_type: str, repo_id: str) -> tuple[int, bytes] | None:
        """The index has a new repo, ref or snapshot: show it. Returns the entry the kernel
        must look up again, (inode of hub/, the repo's folder name), if it changed and the
        kernel may know it (its dentries below go with it)."""
        folder = self.tree.repo_changed(repo_type, repo_id)
        if folder is None:
            return None  # nothing shown changed (a re-resolution that found the same commits)
        self._tables.clear()  # may be of the subtree just replaced
        self._entries.clear()
        self._commit_blobs.clear()
        hub = self.table.ino("hub")
        return (hub, folder.encode()) if hub is not None else None

    # tree helpers ------------------------------------------------------------

    def _node(self, ino: int) -> tuple[str, Node]:
        found = self._entries.get(ino)
        if found is not None:
            return found
        path = self.table.path(ino)
        if path is not None:
            return path, self._walk(path)
        found = self.table.in_range(ino)
        if found is not None:
            key, i = found
            where = key.rpartition("#")[0]
            parts = where.split("/", 4)  # hub/<repo>/snapshots/<commit>[/<folder>] or hub/<repo>/blobs@<commit>
            if len(parts) >= 4 and parts[2] == "snapshots":
                children = self._children(where)
                if isinstance(children, Table) and i < len(children) and f"{where}#{len(children)}" == key:
                    name, node = children.at(i)
                    if len(self._entries) >= _ENTRIES_KEPT:
                        del self._entries[next(iter(self._entries))]
                    found = self._entries[ino] = (f"{where}/{name}", node)
                    return found
            elif len(parts) == 3 and parts[2].startswith("blobs@"):
                block = dict(self._blob_lists(parts[1])).get(parts[2].removeprefix("blobs@"))
                if block is not None and i < len(block) and f"{where}#{len(block)}" == key:
                    path = f"hub/{parts[1]}/blobs/{block.key(i).hex()}"
                    return path, self._walk(path)
        raise FuseError(errno.ENOENT)

    def _walk(self, path: str) -> Node:
        node = self.root
        for part in path.split("/") if path else ():
            node = node.children.get(part)
            if node is None:
                raise FuseError(errno.ENOENT)
        return node

    def _children(self, path: str, node: Node | None = None) -> Mapping[str, Node]:
        """The children of the folder at `path` (`node`, if the caller has it). A table (a snapshot's
        folder, blobs/) is kept for the next requests: a walk asks about its entries one after
        another, and making one reads its block from the tree's cache and checks it."""
        children = self._tables.get(path)
        if children is None:
            children = (node if node is not None else self._walk(path)).children
            if isinstance(children, Table):
                self._tables.put(path, children)
        return children

    # numbers: an entry of a snapshot folder, or a blob, is numbered in its immutable block's range
    # (the inode table writes one row per block, not one per entry); anything else per path.

    def _ino(self, path: str, new: bool = True) -> int | None:
        """The number of `path`, given now if it had none (with `new`)."""
        parts = path.split("/") if self.ranges else ()
        if len(parts) >= 5 and parts[0] == "hub" and parts[2] == "snapshots":
            block = self.tree.folder_block(parts[1], parts[3], "/".join(parts[4:-1]))
            i = block.find(parts[-1].encode()) if block is not None else -1
            if i >= 0:
                key = f"{path.rpartition('/')[0]}#{len(block)}"
                base = self.table.range(key, len(block)) if new else self.table.base(key)
                return None if base is None else base + i
        elif len(parts) == 4 and parts[0] == "hub" and parts[2] == "blobs" and BLOB_ID_RE.fullmatch(parts[3]):
            return self._blob_ino(parts[1], parts[3], new)
        return self.table.ino(path) if new else self.table.find(path)

    def _blob_ino(self, folder: str, blob_id: str, new: bool) -> int | None:
        """`blobs/` changes with every snapshot added, a snapshot's blobs never: a blob is numbered in
        the range of the snapshot listing it whose range came first (a later range has a higher base:
        the choice never changes), or, if none has one yet, of the first snapshot listing it."""
        raw, best, first = bytes.fromhex(blob_id), None, None
        for commit, block in self._blob_lists(folder):
            i = block.find(raw)
            if i < 0:
                continue
            key = f"hub/{folder}/blobs@{commit}#{len(block)}"
            base = self.table.base(key)
            if base is not None and (best is None or base < best):
                best = base + i
            elif first is None:
                first = (key, len(block), i)
        if best is not None or not new or first is None:
            return best if best is not None or new else None
        return self.table.range(first[0], first[1]) + first[2]

    def _blob_lists(self, folder: str) -> list[tuple[str, Block]]:
        """`tree.commit_blobs`, kept for the last repos asked about (a walk looks up a blob per file)."""
        found = self._commit_blobs.get(folder)
        if found is None:
            found = self._commit_blobs.put(folder, self.tree.commit_blobs(folder))
        return found

    def _attr(self, path: str, node: Node, ino: int | None = None) -> Attr:
        ino = self._ino(path) if ino is None else ino
        a = Attr(ino, stat.S_IFREG | 0o444, timeout=_LONG if _lasting(path, node) else _SHORT, time_ns=self._time_ns)
        if node.kind == "dir":
            a.mode, a.nlink = stat.S_IFDIR | (0o1777 if path.startswith(_LOCKS) else 0o555), 2
        elif node.kind == "lock":
            a.mode = stat.S_IFREG | 0o666
        elif node.kind == "static" and _is_ref(path):
            a.mode, a.size = stat.S_IFREG | 0o666, node.size  # rewriting it with what it holds succeeds
        elif node.kind == "symlink":
            a.mode, a.size = stat.S_IFLNK | 0o777, len(node.target)
        else:
            a.size = node.size
        return a

    def inodes_of(self, blob_id: str) -> list[int]:
        """Every inode the kernel may hold pages of this blob under: `blobs/<id>` of each repo that
        lists it, as numbered (by this daemon or one before it). Found from the index, not kept
        per blob looked up (a walk of 10^6 files looks up each blob: ~400 bytes each)."""
        repos = set(self.tree.source.links.repos_of(blob_id))
        rec = self.filler.store.record(blob_id)
        if rec is not None and rec.repo_id:
            repos.add((rec.repo_type, rec.repo_id))  # an index from before the links: the repo it came from
        paths = [f"hub/{repo_folder_name(*repo)}/blobs/{blob_id}" for repo in repos]
        found = {self._ino(path, new=False) for path in paths} | {self.table.find(path) for path in paths}
        return sorted(ino for ino in found if ino is not None)  # by range, or per path (a daemon before ranges)

    # metadata ------------------------------------------------------------------

    @_guard("lookup")
    async def lookup(self, parent_inode: int, name: bytes) -> Attr:
        path, parent = self._node(parent_inode)
        text = name.decode("utf-8", "strict")
        if text in (".", "..") or "/" in text or len(name) > MAX_NAME or parent.kind != "dir":
            raise FuseError(errno.ENOENT)
        child = f"{path}/{text}" if path else text
        children = self._children(path, parent)
        if self.ranges and isinstance(children, Table) and path.split("/", 3)[2:3] == ["snapshots"]:
            i = children.index(text)  # a snapshot folder: the entry's number is its range's base + i
            if i < 0:
                raise FuseError(errno.ENOENT)
            count = len(children)
            return self._attr(child, children.at(i)[1], self.table.range(f"{path}#{count}", count) + i)
        node = children.get(text)
        # A repo resolved on demand: in a task of its own (the session starts lookups outside one),
        # shielded: a looker-up that is killed (INTERRUPT) stops waiting, the resolution goes on.
        if node is None and path == "hub" and self.on_demand is not None:
            if await asyncio.shield(asyncio.get_running_loop().create_task(self.on_demand(text))):
                node = self.tree.hub.children.get(text)
        if node is None:
            raise FuseError(errno.ENOENT)
        return self._attr(child, node)

    @_guard("getattr")
    async def getattr(self, inode: int) -> Attr:
        return self._attr(*self._node(inode), inode)

    @_guard("readlink")
    async def readlink(self, inode: int) -> bytes:
        _, node = self._node(inode)
        if node.kind != "symlink":
            raise FuseError(errno.EINVAL)
        return node.target.encode()

    @_guard("opendir")
    async def opendir(self, inode: int) -> Opened:
        """A folder of a snapshot never changes: the kernel may keep its listing (FOPEN_CACHE_DIR)."""
        path, node = self._node(inode)
        if node.kind != "dir":
            raise FuseError(errno.ENOTDIR)
        parts = path.split("/", 4)
        return Opened(inode, keep_cache=len(parts) >= 4 and parts[2] == "snapshots")

    @_guard("readdir")
    async def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Attr]]:
        """Entries from index `start` on, made as the session packs them: a page
        of a huge folder costs that page (the sorted names are kept per folder)."""
        path, node = self._node(fh)
        children, prefix = self._children(path, node), f"{path}/" if path else ""
        names = children.names() if isinstance(children, Table) else node.names()
        parts = path.split("/", 3)
        if self.ranges and isinstance(children, Table) and len(parts) == 4 and parts[2] == "snapshots":
            count = len(children.block)  # a snapshot folder: its entries are its range, in order
            base = self.table.range(f"{path}#{count}", count) if count else 0
            return (
                (name.encode(), self._attr(prefix + name, node, base + i)) for i, (name, node) in _at(children, start)
            )
        return (
            (names[i].encode(), self._attr(prefix + names[i], children[names[i]])) for i in range(start, len(names))
        )

    @_guard("releasedir")
    async def releasedir(self, fh: int) -> None:
        return None

    @_guard("statfs")
    async def statfs(self) -> tuple[int, int]:
        """(files, longest name): a cache has no free space to report."""
        return len(self.table), MAX_NAME

    @_guard("getxattr")
    async def getxattr(self, inode: int, name: bytes) -> bytes:
        if name != XATTR_CACHED:
            raise FuseError(ENOATTR)
        path, node = self._node(inode)
        if path.count("/") <= 1 and node.kind == "dir":  # the root, hub/ or a repo: the index's counters
            folder = path.partition("/")[2] if "/" in path else None
            blobs, total, complete, done = self.tree.cached(folder, self.filler.store.filling())
            frac = done / total if total else 1.0
            if complete < blobs:
                frac = min(frac, 0.999)  # 1 means stored and verified; unproven bytes never round up to it
            return f"{frac:.6f}".encode()
        parts = path.split("/")
        if len(parts) == 4 and parts[2] == "snapshots" and node.kind == "dir":  # a snapshot: its counters
            found = self._snapshot_cached(parts[1], parts[3])
            if found is not None:
                return found
        recs = [self.filler.record(b) for b in set(_blob_ids(node))]
        total = sum(r.size for r in recs)
        done = sum(self.filler.cached_bytes(r.blob_id) for r in recs)
        frac = done / total if total else 1.0
        if any(r.state != "complete" for r in recs):
            frac = min(frac, 0.999)  # 1 means stored and verified; unproven bytes never round up to it
        return f"{frac:.6f}".encode()

    def _snapshot_cached(self, folder: str, commit: str) -> bytes | None:
        """The fraction stored of a snapshot from the counters the index keeps per snapshot (its
        blobs' bytes, those of the complete ones, how many are not complete) plus the bytes on
        disk of blobs partly stored that this daemon touched: no walk of its files, no record
        read. None for a snapshot without counters (not listed in the index)."""
        repo = parse_repo_folder(folder)
        links = self.tree.source.links
        counts = links.snapshot_counts(*repo).get(commit) if repo is not None else None
        if counts is None:
            return None
        _, _, total, done, _ = counts
        missing = links.snapshots_missing(*repo).get(commit, 0)
        for blob_id, cached in self.filler.store.filling() if missing else ():
            if (*repo, commit) in links.snapshots_of(blob_id):
                done += cached
        frac = min(done / total, 1.0) if total else 1.0
        if missing:
            frac = min(frac, 0.999)  # 1 means stored and verified; unproven bytes never round up to it
        return f"{frac:.6f}".encode()

    @_guard("listxattr")
    async def listxattr(self, inode: int) -> list[bytes]:
        return [XATTR_CACHED]

    # data -----------------------------------------------------------------------

    @_guard("open")
    async def open(self, inode: int, flags: int) -> Opened:
        path, node = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            return self._open_for_writing(path, node, flags)
        if node.kind not in ("blob", "static"):
            raise FuseError(errno.EISDIR if node.kind == "dir" else errno.EINVAL)
        fh = self._handle(inode, READ, node)
        backing = None
        if node.kind == "blob":
            self.filler.hold(node.blob_id, paged=False)  # never evicted while open; read with O_DIRECT
            self._generation[fh] = self.filler.generation(node.blob_id)
            if self.filler.record(node.blob_id).state != "complete" and self.fill_on_open:
                self.filler.fill_in_background(node.blob_id)
            if (repo := opened_in(path)) is not None:
                self.filler.opened_in_repo(*repo[:2], node.blob_id, repo[2])
            # Asked after the fills just started, not before: one that found the file of a complete
            # blob gone (a crash, a lost tier) made a new sparse one and recorded the blob partial,
            # and the kernel would have read that file's zeros itself, never asking us.
            if self.filler.record(node.blob_id).state == "complete":
                backing = self.filler.store.path(node.blob_id)  # verified: the kernel may read it itself
                self._paged.add(fh)
        # Content is immutable: let the kernel keep its page cache across opens.
        return Opened(fh, keep_cache=node.kind == "blob", backing=backing)

    @_guard("read")
    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._handles.get(fh) or self._adopt(fh)
        if node.kind == "lock":
            return b""
        if node.kind == "static":
            return node.data[off : off + size]
        t0 = time.perf_counter()
        # A large read is answered from the session's reply threads (a FileSlice): the loop neither
        # copies the bytes nor writes them to the kernel. A small one costs less than the thread hop.
        # The kernel keeps what it got in its page cache: the chunks of a blob still filling need
        # not be in the page cache of the blob file too (paged=False: written and read with
        # O_DIRECT); a blob complete at open is read through it (see _paged).
        big = size >= SLICE_MIN
        gen = self._generation.get(fh)
        paged = fh in self._paged
        data = await self.filler.read(node.blob_id, off, size, since=gen, as_slice=big, paged=paged)
        self.metrics.fuse_read_seconds.observe(time.perf_counter() - t0)
        return data

    # no-op writes ----------------------------------------------------------------
    #
    # Old clients (huggingface_hub 0.26 online) rewrite refs/<rev> with the commit it
    # already holds and take lock files under .locks/. Those succeed; a write that
    # would change any byte is EROFS. Lock files live in memory, bounded.

    def _open_for_writing(self, path: str, node: Node, flags: int) -> Opened:
        ino = self._ino(path)
        if node.kind == "lock":
            return Opened(self._handle(ino, LOCK, node), direct_io=True)
        if node.kind != "static" or not _is_ref(path) or flags & os.O_APPEND:
            raise FuseError(errno.EROFS)
        fh = self._handle(ino, REWRITE, node)
        # After O_TRUNC the whole content must be written again for the file to stay as it is.
        self._rewrites[fh] = bytearray(len(node.data)) if flags & os.O_TRUNC else bytearray(b"\1" * len(node.data))
        return Opened(fh, direct_io=True)

    def _handle(self, ino: int, kind: int, node: Node) -> int:
        fh = ino << _FH_INO_SHIFT | kind << _FH_SERIAL_BITS | self._next_fh
        self._next_fh = (self._next_fh + 1) % (1 << _FH_SERIAL_BITS)
        self._handles[fh] = node
        return fh

    def _adopt(self, fh: int) -> Node:
        """A handle the previous daemon opened (the connection was handed over): what it
        reads follows from its inode. Its blob is held from now on, as our own handles' are;
        its generation at open is unknown, so a proof that failed before we started is not
        held against it (the failure invalidated the kernel's pages and retired the inode)."""
        if fh_kind(fh) == LOCK:
            node = Node("lock")
        else:
            _, node = self._node(fh_ino(fh))
            if fh_kind(fh) == REWRITE:
                self._rewrites[fh] = bytearray(b"\1" * len(node.data))
        if node.kind == "blob":
            self.filler.hold(node.blob_id, paged=False)
        self._handles[fh] = node
        return node

    @_guard("write")
    async def write(self, fh: int, offset: int, data: bytes) -> int:
        node = self._handles.get(fh) or self._adopt(fh)
        if node.kind == "lock":
            return len(data)  # a lock file's content is nobody's business: dropped
        written = self._rewrites.get(fh)
        if written is None or node.data[offset : offset + len(data)] != data:
            raise FuseError(errno.EROFS)
        written[offset : offset + len(data)] = b"\1" * len(data)
        return len(data)

    @_guard("flush")
    async def flush(self, fh: int) -> None:
        """Where a rewrite after O_TRUNC that left bytes out is refused (close() sees it)."""
        written = self._rewrites.get(fh)
        if written is not None and 0 in written:
            raise FuseError(errno.EROFS)

    @_guard("setattr")
    async def setattr(self, inode: int, valid: int, size: int) -> Attr:
        path, node = self._node(inode)
        harmless = FATTR_TIMES | FATTR_FH | FATTR_LOCKOWNER | FATTR_KILL_SUIDGID
        if node.kind == "lock":
            harmless |= FATTR_MODE | FATTR_SIZE  # filelock chmods and truncates its lock file
        elif node.kind == "static" and _is_ref(path) and size == node.size:
            harmless |= FATTR_SIZE
        if valid & ~harmless:
            raise FuseError(errno.EROFS)
        return self._attr(path, node)

    @_guard("create")
    async def create(self, parent_inode: int, name: bytes, flags: int) -> tuple[Attr, Opened]:
        path, parent = self._node(parent_inode)
        text = name.decode("utf-8", "strict")
        if not path.startswith(_LOCKS + "/") or parent.kind != "dir" or path.count("/") != 2:
            raise FuseError(errno.EROFS)  # lock files go in .locks/<repo folder>/ only
        if text in (".", "..") or "/" in text or len(name) > MAX_NAME:
            raise FuseError(errno.EINVAL)
        node = parent.children.get(text)
        if node is None:
            if self._locks >= MAX_LOCK_FILES:
                raise FuseError(errno.ENOSPC)
            node = Node("lock")
            parent.put(text, node)
            self._locks += 1
        elif node.kind != "lock":
            raise FuseError(errno.EROFS)
        return self._attr(f"{path}/{text}", node), Opened(
            self._handle(self._ino(f"{path}/{text}"), LOCK, node), direct_io=True
        )

    @_guard("unlink")
    async def unlink(self, parent_inode: int, name: bytes) -> None:
        path, parent = self._node(parent_inode)
        node = parent.children.get(name.decode("utf-8", "strict")) if parent.kind == "dir" else None
        if node is None:
            raise FuseError(errno.ENOENT)
        if node.kind != "lock":
            raise FuseError(errno.EROFS)
        parent.put(name.decode(), None)
        self._locks -= 1

    async def release(self, fh: int) -> None:
        self._rewrites.pop(fh, None)
        node = self._handles.pop(fh, None)
        self._generation.pop(fh, None)
        self._paged.discard(fh)
        if node is not None and node.kind == "blob":
            self.filler.release(node.blob_id, paged=False)


class _Kept:
    """The last values put, at most `count` of them and `max_bytes` of what they hold (`size`),
    the oldest out first. One bigger than `max_bytes` is kept alone: made again per request,
    the blob lists of a repo of 10^6 files would be read from the index and checked each time."""

    def __init__(self, count: int, max_bytes: int, size: Callable[[object], int]):
        self.count, self.max_bytes, self.size = count, max_bytes, size
        self.nbytes = 0
        self._kept: dict[str, tuple[object, int]] = {}

    def get(self, key: str):
        found = self._kept.get(key)
        return None if found is None else found[0]

    def put(self, key: str, value):
        size = self.size(value)
        old = self._kept.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        while self._kept and (len(self._kept) >= self.count or self.nbytes + size > self.max_bytes):
            self.nbytes -= self._kept.pop(next(iter(self._kept)))[1]
        self._kept[key] = (value, size)
        self.nbytes += size
        return value

    def clear(self) -> None:
        self._kept.clear()
        self.nbytes = 0

    def values(self) -> list:
        return [value for value, _ in self._kept.values()]

    def __len__(self) -> int:
        return len(self._kept)


def _lasting(path: str, node: Node) -> bool:
    """Whether the kernel may keep this entry and its attributes a day: the root, `hub/`, a repo's
    folder and its `snapshots/` and `blobs/` and all below them. Their attributes never change,
    nor does what a name below them names (a commit's files, a blob's bytes); a folder's listing
    is not kept by the kernel (but a snapshot's). When a repo changes (a new revision, a ref
    moved, gone) the kernel drops its folder's dentries and all below (`FuseMount.tree_changed`).
    Refs and lock files change by name: a second."""
    parts = path.split("/", 3)
    if len(parts) < 2:
        return True
    if parts[1] == _LOCKS.partition("/")[2] or parts[0] != "hub":
        return False
    return node.kind == "dir" if len(parts) == 2 else parts[2] in ("snapshots", "blobs")


def _at(table: Table, start: int) -> Iterator[tuple[int, tuple[str, Node]]]:
    for i in range(start, len(table)):
        yield i, table.at(i)


def _blob_ids(node: Node):
    """Blobs below a node: blob files, and the targets of snapshot symlinks."""
    if node.kind == "blob":
        yield node.blob_id
    elif node.kind == "symlink" and "/blobs/" in node.target:
        yield node.target.rsplit("/", 1)[1]
    for child in node.children.values():
        yield from _blob_ids(child)
