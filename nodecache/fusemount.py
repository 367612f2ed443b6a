"""The FUSE face as the daemon runs it: mount the tree (or take it over), serve it, keep it current.

With a keeper (`keeper_socket`), the connection outlives the daemon: at start
the daemon takes the connection the keeper holds and asks the kernel to resend
what the previous daemon read and never answered; at stop it stops reading,
answers what is in flight for up to `handover_grace`, and exits leaving the
rest for the next daemon. Readers only wait.

Without one (or when the keeper is gone), shutdown order matters: readers still
waiting for bytes are woken with EIO first, then the mount is detached while
the session still answers (a reader's immediate retry gets EIO again, not
ECONNABORTED), and the connection goes once the kernel lets go of it or after a
short grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import mounts
from .config import Config
from .connstate import ConnState
from .fill import Filler
from .fusefs import NodecacheFS
from .fusesession import Session
from .index import Index
from .inodes import InodeTable
from .lease import Lease
from .metrics import Metrics
from .status import Serving
from .store import Store
from .tree import HubTree

log = logging.getLogger(__name__)


class FuseMount:
    def __init__(self, cfg: Config, index: Index, store: Store, metrics: Metrics, serving: Serving):
        self.cfg, self.index, self.store, self.metrics, self.serving = cfg, index, store, metrics, serving
        self.fs: NodecacheFS | None = None
        self.session: Session | None = None
        self.mountpoint: Path | None = None
        self._lease: Lease | None = None
        self._table: InodeTable | None = None
        self._main: asyncio.Task | None = None  # the session serving
        self._background: set[asyncio.Task] = set()

    def tree_changed(self, repo_type: str, repo_id: str) -> None:
        """The index changed (a repo resolved, a ref moved): the mounted tree shows it (one call)."""
        if self.fs is None:
            return
        entry = self.fs.repo_changed(repo_type, repo_id)
        if entry is not None and self.session is not None:
            task = asyncio.get_running_loop().create_task(self.session.invalidate_entries([entry]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def quarantined(self, blob_id: str) -> None:
        """A blob failed its proof: the pages the kernel cached of it must go too, and
        handles the kernel reads in passthrough mode must stop reading its file."""
        if self.fs is None or self.session is None:
            return
        session, inodes = self.session, self.fs.inodes_of(blob_id)
        if any(session.in_passthrough(ino) for ino in inodes):
            self.store.discard_quarantined(blob_id)
            for ino in inodes:
                session.retire(ino)

        async def drop() -> None:
            self.metrics.page_cache_invalidations.inc(await session.invalidate(inodes))

        task = asyncio.get_running_loop().create_task(drop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def take_over(
        self, mountpoint: Path, filler: Filler, on_demand: Callable[[str], Awaitable[bool]] | None
    ) -> None:
        """Build the FUSE face; when the keeper holds our connection, serve it now, before the rest
        of the start (resolving repos, HTTP): its readers are waiting. `serve` does the rest."""
        cfg = self.cfg
        # Resolve the parent only: with a connection held for us nobody answers a stat of the mount yet.
        self.mountpoint = mountpoint = mountpoint.absolute().parent.resolve() / mountpoint.name
        lease = self._lease = (
            Lease(cfg.keeper_socket, str(mountpoint), cfg.state_format, cfg.keeper_wait) if cfg.keeper_socket else None
        )
        table = self._table = InodeTable(cfg.cache_dir / "connection")
        ranges = cfg.state_format >= 3  # a daemon reading formats up to 2 cannot serve range numbers
        self.fs = NodecacheFS(HubTree(self.index), filler, self.metrics, table, cfg.fill_on_open, on_demand, ranges)
        opens = self.metrics.fuse_opens
        session = self.session = Session(
            self.fs,
            mountpoint,
            table,
            passthrough=cfg.passthrough,
            on_open=lambda passthrough: opens.labels("passthrough" if passthrough else "served").inc(),
        )
        taken = await lease.take() if lease is not None else None
        if taken is None:
            return
        if not self._adopt(session, table, *taken):
            await lease.drop()
            return
        self._main = asyncio.get_running_loop().create_task(session.serve())
        resent = session.resend()
        lease.fmt = self._format(table)
        await lease.deposit(session.fd, self._state(session, table, mountpoint))  # in our format
        how = "requests left unanswered resent" if resent else "no FUSE_NOTIFY_RESEND in this kernel"
        log.info("took over the connection at %s (state format %d; %s)", mountpoint, taken[1].format, how)

    async def serve(
        self,
        mountpoint: Path,
        filler: Filler,
        on_demand: Callable[[str], Awaitable[bool]] | None,
        stop: asyncio.Event,
    ) -> None:
        """Serve the connection taken over, or mount a new one, until `stop`; then hand it over
        (keeper) or unmount (none); `serving.ready` while the mount answers."""
        if self.session is None:
            await self.take_over(mountpoint, filler, on_demand)
        session, table, lease = self.session, self._table, self._lease
        assert session is not None and table is not None
        try:
            if self._main is None:
                await self._mount(session, table, self.mountpoint, lease)
                main = self._main = asyncio.get_running_loop().create_task(session.serve())
                await asyncio.wait(
                    [main, asyncio.ensure_future(session.initialized.wait())], return_when="FIRST_COMPLETED"
                )
                if session.initialized.is_set():
                    await self._initialized(session, table, self.mountpoint, lease)
            main = self._main
            if session.initialized.is_set():
                self.serving.passthrough = session.passthrough
                self.serving.ready = True
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([main, stopped], return_when="FIRST_COMPLETED")
            stopped.cancel()
            self.serving.ready = False
            if lease is not None and lease.held and not main.done():
                await self.release()
                await filler.close()
            else:
                await filler.close()  # wake every waiting reader with EIO
                await session.unmount()  # then the mount goes, answering (EIO) until its readers let go
                if lease is not None:
                    await lease.drop()
        finally:
            await self.release()

    async def release(self) -> None:
        """Let go of the connection: handed over to the keeper when it holds it (whether or not
        `serve` ran: a start that failed after the takeover leaves it for the next daemon),
        else closed. Then the lease ends, and the next daemon may take the connection."""
        session, lease = self.session, self._lease
        if session is None:
            return
        if lease is not None and lease.held and session.fd >= 0:
            left = await session.handover(self.cfg.handover_grace)
            log.info("handed the connection over to the keeper (%d request(s) left to resend)", left)
        session.close()
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if lease is not None:
            lease.close()
        if self._table is not None:
            self._table.close()
            self._table = None
        # The tree is no longer shown from here (its inode table is closed): a repo that HTTP
        # requests still running register now is the next daemon's to show, as a failed proof is.
        self.fs = None

    def _adopt(self, session: Session, table: InodeTable, fd: int, state: ConnState) -> bool:
        """Serve the connection the keeper held, if it is still the one mounted here and the
        inode table is its own; else it is dropped (the CSI plugin re-binds pods to a new one)."""
        top = mounts.top(str(session.mountpoint))
        why = None
        if state.mount != str(session.mountpoint):
            why = f"it was mounted at {state.mount}"
        elif top is None or top.dev != state.dev:
            why = "it is no longer mounted there"
        elif state.conn_id is not None and state.conn_id != table.conn_id:
            why = f"the inode table at {self.cfg.cache_dir / 'connection'} is not its own"
        if why is not None:
            log.error("not taking over the connection of %s: %s; mounting a new one", session.mountpoint, why)
            os.close(fd)
            return False
        session.adopt(fd, state.dev, state.flags, state.minor)
        return True

    async def _mount(self, session: Session, table: InodeTable, mountpoint: Path, lease: Lease | None) -> None:
        if mounts.detach(mountpoint):  # a daemon killed with -9 leaves a dead FUSE mount (ENOTCONN)
            log.warning("detached a stale mount at %s", mountpoint)
        mountpoint.mkdir(parents=True, exist_ok=True)
        table.reset()  # a new connection: the kernel knows no inode number yet
        try:
            session.mount()
        except OSError as e:  # e.g. no /dev/fuse, not root, mountpoint busy: one clear line
            raise OSError(f"cannot mount FUSE at {mountpoint}: {e.strerror or e}") from None

    async def _initialized(self, session: Session, table: InodeTable, mountpoint: Path, lease: Lease | None) -> None:
        await asyncio.sleep(0.05)  # the INIT reply resets read_ahead_kb: write after it
        if not mounts.set_read_ahead(mountpoint, self.cfg.bdi_read_ahead_kb):
            log.warning("could not raise read_ahead_kb; reads stay at 128 KiB")
        log.info("mounted at %s (passthrough %s)", mountpoint, "on" if session.passthrough else "off")
        if lease is not None:
            lease.fmt = self._format(table)
            await lease.deposit(session.fd, self._state(session, table, mountpoint))

    def _format(self, table: InodeTable) -> int:
        """The state format to hand over: the configured one, unless the kernel may hold range
        numbers (given by a daemon of format 3) that a daemon reading only that format could not serve."""
        if table.ranged and self.cfg.state_format < 3:
            log.warning(
                "the connection holds inode numbers given as ranges: handing it over in state format 3, not %d"
                " (a daemon that reads only format %d mounts a new connection)",
                self.cfg.state_format,
                self.cfg.state_format,
            )
            return 3
        return self.cfg.state_format

    @staticmethod
    def _state(session: Session, table: InodeTable, mountpoint: Path) -> ConnState:
        return ConnState(str(mountpoint), session.dev, session.minor, session.agreed, table.conn_id)
