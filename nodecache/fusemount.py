"""The FUSE face as the daemon runs it: mount the tree, serve it, keep it current.

Shutdown order matters: readers still waiting for bytes are woken with EIO
first, then the mount is detached while the session still answers (a reader's
immediate retry gets EIO again, not ECONNABORTED), and the connection goes once
the kernel lets go of it or after a short grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import mounts
from .config import Config
from .fill import Filler
from .fusefs import NodecacheFS
from .fusesession import Session
from .index import Index
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
        self._background: set[asyncio.Task] = set()

    def tree_changed(self, repo_type: str, repo_id: str) -> None:
        """The index changed (a repo resolved, a ref moved): the mounted tree shows it (one call)."""
        if self.fs is not None:
            self.fs.repo_changed(repo_type, repo_id)

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

    async def serve(
        self,
        mountpoint: Path,
        filler: Filler,
        on_demand: Callable[[str], Awaitable[bool]] | None,
        stop: asyncio.Event,
    ) -> None:
        """Mount, serve until `stop`, unmount; `serving.ready` while the mount answers."""
        if mounts.detach(mountpoint):  # a daemon killed with -9 leaves a dead FUSE mount (ENOTCONN)
            log.warning("detached a stale mount at %s", mountpoint.absolute())
        mountpoint.mkdir(parents=True, exist_ok=True)
        mountpoint = mountpoint.resolve()  # now, before mounting: later it would stat our own mount
        cfg = self.cfg
        self.fs = NodecacheFS(HubTree(self.index), filler, self.metrics, cfg.fill_on_open, on_demand)
        opens = self.metrics.fuse_opens
        session = self.session = Session(
            self.fs,
            mountpoint,
            passthrough=cfg.passthrough,
            on_open=lambda passthrough: opens.labels("passthrough" if passthrough else "served").inc(),
        )
        self.fs.kernel = session
        try:
            session.mount()
        except OSError as e:  # e.g. no /dev/fuse, not root, mountpoint busy: one clear line
            raise OSError(f"cannot mount FUSE at {mountpoint}: {e.strerror or e}") from None
        main = asyncio.get_running_loop().create_task(session.serve())
        try:
            await asyncio.wait([main, asyncio.ensure_future(session.initialized.wait())], return_when="FIRST_COMPLETED")
            if session.initialized.is_set():
                await asyncio.sleep(0.05)  # the INIT reply resets read_ahead_kb: write after it
                if not mounts.set_read_ahead(mountpoint, cfg.bdi_read_ahead_kb):
                    log.warning("could not raise read_ahead_kb; reads stay at 128 KiB")
                self.serving.passthrough = session.passthrough
                self.serving.ready = True
                log.info("mounted at %s (passthrough %s)", mountpoint, "on" if session.passthrough else "off")
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([main, stopped], return_when="FIRST_COMPLETED")
            stopped.cancel()
            self.serving.ready = False
            await filler.close()  # wake every waiting reader with EIO
            await session.unmount()  # then the mount goes, answering (EIO) until its readers let go
        finally:
            session.close()
            with contextlib.suppress(asyncio.CancelledError):
                await main
