"""A daemon's hold on the keeper: take the connection at start, deposit a new one, keep it deposited.

The keeper may start after the daemon, or restart under it (its own rollout):
the fd is deposited again whenever the keeper comes back, so at any time
either the keeper holds the connection (a restart hands it over) or the daemon
knows it does not (a stop detaches the mount, as without a keeper).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from . import connstate
from .connstate import ConnState, StateError
from .keeper import KeeperBusy, KeeperClient, KeeperError

log = logging.getLogger(__name__)


class Lease:
    def __init__(self, socket_path: Path, mount: str, fmt: int = connstate.FORMAT, timeout: float = 30.0):
        self.client = KeeperClient(socket_path, timeout)
        self.mount = mount
        self.fmt = fmt
        self.held = False  # the keeper holds our connection now: a stop hands it over
        self._deposit: tuple[int, ConnState] | None = None
        self._watch: asyncio.Task | None = None

    async def take(self) -> tuple[int, ConnState] | None:
        """The connection the keeper holds for our mount, with its lease; None: mount a new one."""
        try:
            taken = await asyncio.to_thread(self.client.take, self.mount)
        except KeeperBusy as e:  # mounting over a live daemon's mount would take it from its pods
            raise OSError(f"{e.strerror}; not mounting over it") from None
        except KeeperError as e:
            log.warning("no keeper (%s): this mount ends with this daemon", e.strerror)
            self.client.close()
            return None
        if taken is None:
            return None
        fd, raw = taken
        try:
            state = connstate.decode(raw)
        except StateError as e:
            log.error("the keeper's connection of %s is unusable (%s); mounting a new one", self.mount, e)
            os.close(fd)
            await self.drop()
            return None
        self.held = True
        return fd, state

    async def deposit(self, fd: int, state: ConnState) -> None:
        """Give the keeper (a dup of) our connection, now and whenever it comes back."""
        self._deposit = (fd, state)
        await self._send()
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._keep())

    async def _send(self) -> None:
        assert self._deposit is not None
        fd, state = self._deposit
        try:
            await asyncio.to_thread(self.client.deposit, self.mount, fd, connstate.encode(state, self.fmt))
        except KeeperError as e:
            if self.held or self._watch is None:
                log.warning("%s; a stop now unmounts", e.strerror)
            self.held = False
            self.client.close()
            return
        if not self.held:
            log.info("the keeper holds the connection of %s", self.mount)
        self.held = True

    async def _keep(self) -> None:
        """Watch the lease; when the keeper goes, deposit again every 2 s until it is back."""
        loop = asyncio.get_running_loop()
        while True:
            sock = self.client.sock
            if self.held and sock is not None:
                gone, fd = loop.create_future(), sock.fileno()
                loop.add_reader(fd, lambda g=gone: g.done() or g.set_result(None))
                try:
                    await gone  # the keeper never speaks first: readable means it hung up
                finally:
                    loop.remove_reader(fd)
                log.warning("lost the keeper; a stop now unmounts until it is back")
                self.held = False
                self.client.close()
            await asyncio.sleep(2.0)
            await self._send()

    async def drop(self) -> None:
        """The connection is not worth keeping (unusable state, unmounted for good)."""
        with contextlib.suppress(KeeperError):
            await asyncio.to_thread(self.client.drop, self.mount)
        self.held = False

    def close(self) -> None:
        """End the lease (the process exit would too): the next daemon may take the connection."""
        if self._watch is not None:
            self._watch.cancel()
        self.client.close()
        self.held = False
