"""Jobs: a fill (prefetch) or a re-check (verify) of blobs that outlives the request that started it.

Status is truthful by construction: `ready` only after every blob of the
snapshot is complete, i.e. all chunks stored and the whole-blob hash matched.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .fill import Filler, FillError
from .repos import RepoRef
from .upstream import UpstreamError

log = logging.getLogger(__name__)
MAX_KEPT = 1000  # jobs remembered for GET /v1/jobs/{id}

Work = Callable[[list[str], Callable[[int], None]], Awaitable[dict | None]]


@dataclass
class Job:
    id: str
    ref: RepoRef | None  # None: every blob of the cache (verify); revision "": every cached revision
    blobs: list[str]  # what the job works on, until it ends
    total: int
    kind: str = "prefetch"  # prefetch | verify
    result: dict = field(default_factory=dict)  # what the work reported (verify: checked, failed, ...)
    done: int = 0
    state: str = "running"  # running | ready | error
    error: str = ""
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    task: asyncio.Task | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        elapsed = (self.finished or time.time()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.state == "running" else None
        ref = self.ref
        return {
            "id": self.id,
            "kind": self.kind,
            "repo": ref.repo_id if ref else None,
            "repo_type": ref.repo_type if ref else None,
            "revision": (ref.revision or None) if ref else None,
            "commit": (ref.commit or None) if ref else None,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "rate_Bps": round(rate),
            "seconds": round(elapsed, 3),  # from the request to now, or to verified completion
            "eta_s": None if eta is None else round(eta, 1),
            "error": self.error,
            **self.result,
        }


class Jobs:
    """All prefetch jobs of one daemon; one running job per snapshot."""

    def __init__(self, filler: Filler):
        self.filler = filler
        self.jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)

    def start(
        self, ref: RepoRef | None, blobs: list[str], total: int, kind: str = "prefetch", work: Work | None = None
    ) -> Job:
        """A new job, or the running one of the same kind for the same snapshot. `work(blobs,
        progress)` does it (default: fill the blobs) and may return fields for the job's answer."""
        for job in self.jobs.values():
            if job.state == "running" and _key(job.kind, job.ref) == _key(kind, ref):
                return job
        self._forget_finished()
        job = Job(str(next(self._ids)), ref, blobs, total, kind)
        job.task = asyncio.get_running_loop().create_task(self._run(job, work or self.filler.fill_blobs))
        self.jobs[job.id] = job
        return job

    async def _run(self, job: Job, work: Work) -> None:
        def progress(done: int) -> None:
            job.done = done

        try:
            job.result = await work(job.blobs, progress) or {}
            job.state = "ready"
        except (FillError, UpstreamError) as e:
            job.state, job.error = "error", str(e)
            # Said in the log too: a job nobody polls (a preload, a test waiting for the repo to
            # be complete) otherwise ends without a trace, and the log reads like a hang.
            log.warning("%s job %s (%s) failed: %s", job.kind, job.id, job.ref or "every blob", e)
        except asyncio.CancelledError:
            job.state, job.error = "error", "daemon is shutting down"
        except Exception as e:  # a job never stays "running" forever: it would block its snapshot
            log.exception("job %s (%s) failed", job.id, job.ref)
            job.state, job.error = "error", f"internal error: {e.__class__.__name__}: {e}"
        finally:
            job.finished = time.time()
            job.blobs = []  # a finished job is remembered (MAX_KEPT), its blob list need not be

    def _forget_finished(self) -> None:
        """Bounded: past MAX_KEPT jobs, the oldest finished ones are forgotten (running ones never)."""
        finished = [j.id for j in self.jobs.values() if j.state != "running"]
        for job_id in finished[: max(0, len(self.jobs) - MAX_KEPT + 1)]:
            del self.jobs[job_id]

    def counts(self) -> dict[str, int]:
        out = {"running": 0, "ready": 0, "error": 0}
        for job in self.jobs.values():
            out[job.state] += 1
        return out

    async def close(self) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task and not j.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _key(kind: str, ref: RepoRef | None) -> tuple:
    """Jobs of one kind for one snapshot are one job (whichever revision named it)."""
    return (kind,) if ref is None else (kind, ref.repo_type, ref.repo_id, ref.commit)
