"""Whole-blob fills: after a blob's first open (or for a prefetch), all of its chunks.

Each blob gets `parallel_per_blob` workers, or more when asked (a running
fill gains workers: the snapshot fill gives the shard read next more). A worker claims the next
consecutive chunks nobody fetches yet and asks one source for them as one
streamed request (a run), so a connection is not idle between chunks; the
chunks of a run are still coalesced one by one with readers (chunks.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from contextlib import aclosing

from .chunks import Chunks, FillError, consume
from .config import Config
from .metrics import Metrics
from .presence import BlobState
from .slots import AHEAD, BACKGROUND
from .upstream import PiecewiseSource, Source, UpstreamError

log = logging.getLogger(__name__)


class _Fill:
    """One blob's whole-blob fill: the chunks nobody has claimed yet, and its workers."""

    def __init__(self, st: BlobState):
        self.todo = deque(k for k in range(st.rec.n_chunks) if not st.has(k))
        self.workers: set[asyncio.Task] = set()
        self.claimed = asyncio.Event()  # every chunk is fetched, being fetched or present


class BlobFills:
    """The whole-blob fills of a node: one per blob, joined by everyone who asks."""

    def __init__(self, cfg: Config, chunks: Chunks, metrics: Metrics):
        self.cfg, self.chunks, self.metrics = cfg, chunks, metrics
        self.running = chunks.store.in_use.running  # eviction spares what is filling
        self._fills: dict[str, _Fill] = {}
        self._pumps: dict[asyncio.Task, str] = {}  # streamed multi-chunk requests (runs) -> their blob

    def start(self, st: BlobState, workers: int | None = None) -> asyncio.Task:
        """Start (or join) filling the whole blob with `workers` workers (parallel_per_blob);
        a running fill with fewer gets more (the snapshot fill gives the shard a loader reads
        next most of the node's connections)."""
        blob_id = st.rec.blob_id
        want = workers or self.cfg.parallel_per_blob
        task = self.running.get(blob_id)
        if task is None:
            fill = self._fills[blob_id] = _Fill(st)
            task = self.running[blob_id] = asyncio.get_running_loop().create_task(self._fill_blob(st, fill))
            task.add_done_callback(
                lambda t: (self.running.pop(blob_id, None), self._fills.pop(blob_id, None), consume(t))
            )
        fill = self._fills.get(blob_id)
        if fill is not None and not task.done():
            # No more workers than chunks nobody claimed: one more would only find nothing to
            # do (a prefetch of a million one-chunk files started 8 tasks a file for 1 chunk).
            for _ in range(min(want - len(fill.workers), len(fill.todo))):
                self._add_worker(st, fill)
        return task

    async def claimed(self, blob_id: str) -> None:
        """Until every chunk of the blob's running fill is claimed by a worker (at once if none runs)."""
        fill, task = self._fills.get(blob_id), self.running.get(blob_id)
        if fill is not None and task is not None:
            waiter = asyncio.ensure_future(fill.claimed.wait())
            try:
                await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    def _add_worker(self, st: BlobState, fill: _Fill) -> None:
        worker = asyncio.get_running_loop().create_task(self._worker(st, fill))
        worker.add_done_callback(consume)  # its error is the fill's: seen there
        fill.workers.add(worker)

    async def _fill_blob(self, st: BlobState, fill: _Fill) -> None:
        # As gather() did: the first worker's error is the fill's, the others finish their chunks;
        # cancelling the fill cancels them. Every worker is looked at, also one added (start) while
        # the wait ran and ended before it did: only the waited-for ones were, and such a worker's
        # error (NoSpace, an upstream's) was lost; the fill then proved a file with chunks missing,
        # and quarantined the blob as if its sources had served wrong bytes.
        try:
            while True:
                for w in fill.workers:
                    if w.done() and not w.cancelled() and w.exception() is not None:
                        raise w.exception()
                pending = [w for w in fill.workers if not w.done()]
                if not pending:
                    break
                await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            for w in fill.workers:
                w.cancel()
            raise
        if st.missing:  # never prove a file with holes: that failed proof would blame the sources
            raise FillError(f"fill of {st.rec.blob_id} ended with {st.missing} chunk(s) not stored")
        await asyncio.shield(self.chunks.finish(st))

    async def _worker(self, st: BlobState, fill: _Fill) -> None:
        # Pipelined: the next run is asked for once this one's last bytes are
        # on their way (a stream that can tell: the next request then goes out
        # on the same connection as they are in), else once they are off the
        # wire, while its chunks are still being written and synced.
        chunks = self.chunks
        writing: list[asyncio.Task] = []
        while claim := self._claim(st, fill.todo, len(fill.workers)):
            run, source = claim
            if not fill.todo:
                fill.claimed.set()
            if source is not None:
                tasks, ending = self._start_run(st, run, source)
                await ending.wait()
            else:
                tasks = [chunks.get(st, run[0], demand=False, background=True)]
                await chunks.off_the_wire((st.rec.blob_id, run[-1]), tasks[-1])
            for t in writing:
                await t
            writing = tasks
        fill.claimed.set()
        for t in writing:
            await t

    def _claim(self, st: BlobState, todo: deque[int], workers: int) -> tuple[list[int], Source | None] | None:
        """The next chunks one worker should fetch with one request: consecutive,
        nobody fetching them yet, all from one source that serves a range in one
        request; a single chunk while the blob is open.

        Returns (chunks, that source), or ([chunk], None) for a fetch through
        the usual chain (a source that serves chunk by chunk, or a chunk a
        reader already fetches); None when nothing is left.
        """
        while todo and st.has(todo[0]):
            todo.popleft()
        if not todo:
            return None
        run = [todo.popleft()]
        size = run_length(len(todo) + 1, workers, self.cfg.fill_run_chunks)
        if self.chunks.is_open(st.rec.blob_id):
            size = 1  # someone reads it front to back: one chunk per request lands chunks in that order
        chain = self.chunks.chain(st.rec, run[0])
        if not chain or isinstance(chain[0], PiecewiseSource) or self.chunks.busy(st, run[0]) or st.rec.size == 0:
            return run, None
        first = chain[0]
        while (
            len(run) < size
            and todo
            and todo[0] == run[-1] + 1
            and not self.chunks.busy(st, todo[0])
            and self.chunks.chain(st.rec, todo[0])[0] is first
        ):
            run.append(todo.popleft())
        return run, first

    def _start_run(self, st: BlobState, run: list[int], source: Source) -> tuple[list[asyncio.Task], asyncio.Event]:
        """Chunks run[0..] as one ranged GET from `source`; each chunk is its own coalesced task.
        The event is set once the run's last bytes are on their way or the run is over."""
        loop = asyncio.get_running_loop()
        handed = {k: loop.create_future() for k in run}
        tasks = [self.chunks.get(st, k, demand=False, handed=handed[k], background=True) for k in run]
        ending = asyncio.Event()
        pump = loop.create_task(self._pump(st, run, source, handed, tasks, ending))
        self._pumps[pump] = st.rec.blob_id
        pump.add_done_callback(lambda t: (self._pumps.pop(t, None), ending.set(), consume(t)))
        return tasks, ending

    async def _pump(
        self,
        st: BlobState,
        run: list[int],
        source: Source,
        handed: dict,
        tasks: list[asyncio.Task],
        ending: asyncio.Event,
    ) -> None:
        """Hand each chunk of the stream to its task as it arrives.

        At most two chunks of a run wait for their writes (bounded memory).
        If the stream breaks, the chunks not yet handed are fetched one by
        one, with the usual retries and every source in order. Once the
        stream's last bytes are on their way, its slot is given back and
        `ending` set: the worker's next run (or a reader, first) takes the
        slot, and its request goes out on this connection as it frees.
        """
        start, end = st.chunk_range(run[0])[0], st.chunk_range(run[-1])[1]
        kind = source.kind
        i = 0
        keys = [(st.rec.blob_id, k) for k in run]
        # A blob a reader has open goes before those nobody reads yet (the snapshot's next shards):
        # its runs are queued for a slot a run ahead (a follow-up each), and so are theirs.
        ticket = await self.chunks.take_slot(keys, AHEAD if self.chunks.is_open(st.rec.blob_id) else BACKGROUND)
        slot = [ticket]  # given back once, at the stream's ending or its end

        def give_back() -> None:
            if slot:
                self.chunks.give_slot(keys, slot.pop())
            ending.set()

        self.metrics.fill_inflight.inc()
        try:
            async with aclosing(source.stream(st.rec, start, end, st.rec.chunk_size, give_back)) as parts:
                async for data in parts:
                    self.chunks.served(st.rec.blob_id, source)
                    fut = handed.pop(run[i])  # the chunk's task holds it; a buffer is held no longer than it
                    if not fut.done():  # its task may have been cancelled
                        fut.set_result((data, kind))
                    del data, fut
                    i += 1
                    if 2 <= i < len(run):  # not after the last part: the connection goes back to the pool now
                        await asyncio.wait({tasks[i - 2]})
        except UpstreamError as e:
            log.info("%s/%s [%d-%d) from %s broke at chunk %d: %s", st.rec.repo_id, st.rec.path, start, end,
                     source.name, run[i] if i < len(run) else run[-1], e)  # fmt: skip
        finally:
            self.metrics.fill_inflight.dec()
            give_back()
            for fut in handed.values():
                if not fut.done():
                    fut.set_result((None, kind))

    def stop(self, blob_ids: set[str]) -> list[asyncio.Task]:
        """Cancel these blobs' fills: their whole-blob fills, chunk fetches and runs (those
        first: a run that ends hands its chunks' tasks nothing, and they would fetch them
        alone). Returns the tasks to wait for."""
        inflight = self.chunks.inflight
        stopped = [t for (b, _), t in list(inflight.items()) if b in blob_ids]
        stopped += [t for t, b in list(self._pumps.items()) if b in blob_ids]
        # The workers too: a fill cancelled before its first step never cancels them itself.
        stopped += [w for b in blob_ids if (fill := self._fills.get(b)) is not None for w in fill.workers]
        stopped += [self.running[b] for b in blob_ids if b in self.running]
        for t in stopped:
            if not t.cancelling():  # once: a second reader finding the tier full waits on the same
                t.cancel()
        return stopped

    def tasks(self) -> list[asyncio.Task]:
        """Every run and whole-blob fill running (for shutdown)."""
        return [*self._pumps, *self.running.values()]


def run_length(left: int, workers: int, most: int) -> int:
    """Chunks in the next request of a whole-blob fill with `left` chunks to go.

    Guided self-scheduling: half a fair share, at most `most`. Long runs save
    the idle gap between requests on a connection; shrinking them towards the
    end lets the workers finish together and keeps the in-order hash of the
    blob close behind its last byte.
    """
    return max(1, min(most, left // (2 * workers)))
