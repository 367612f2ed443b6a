"""The control API (`/v1`): repos, status, prefetch and verify jobs, pins, eviction.

When an admin token is configured, every `/v1` call needs `Authorization:
Bearer <admin token>`: mutating ones because they fill or empty the disk, reads
because they name every repo on the node, private ones included. Thin: every call is
one call on Operations or Status.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from .auth import admin_only
from .layout import REPO_TYPES, InvalidName, RepoSpec, validate_repo_id, validate_repo_type
from .ops import Operations
from .status import Status


def _spec(body: dict, need_repo: bool = True) -> RepoSpec | None:
    """{"repo": "org/name", "revision": "main", "repo_type": "model"} -> RepoSpec (revision None if absent)."""
    repo = body.get("repo")
    if repo is None and not need_repo:
        return None
    if not isinstance(repo, str):
        raise ValueError("field 'repo' (string 'org/name') is required")
    repo_type = body.get("repo_type", "model")
    if repo_type not in REPO_TYPES:
        raise ValueError(f"field 'repo_type' must be one of {sorted(REPO_TYPES)}")
    revision = body.get("revision")
    return RepoSpec(repo_type, repo, None if revision is None else str(revision))


def _seconds(text: str, name: str, most: float = 300.0) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= most:  # also refuses NaN
        raise ValueError(f"query '{name}' must be a number of seconds from 0 to {most:.0f}")
    return value


async def _body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError:
        raise ValueError("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    return body


def add_routes(app: web.Application, admin_token: str | None, ops: Operations, report: Status) -> None:
    Routes(ops, report).add_to(app, admin_only(admin_token))


def not_found(e: KeyError) -> web.HTTPNotFound:
    """404 with the KeyError's message (the /v1 and compile-cache faces share it)."""
    return web.HTTPNotFound(reason="not_found", text=str(e.args[0]))


class Routes:
    """Each handler is one call on Operations (what changes the node) or Status (what it reports)."""

    def __init__(self, ops: Operations, report: Status):
        self.ops, self.report = ops, report

    def add_to(self, app: web.Application, admin) -> None:
        # Reads name repos (private ones included): with an admin token configured, they need it too.
        app.router.add_get("/v1/repos", admin(self.repos))
        app.router.add_get("/v1/repos/{repo:[^/]+(?:/[^/]+)?}", admin(self.repo))
        app.router.add_get("/v1/status", admin(self.status))
        app.router.add_post("/v1/prefetch", admin(self.prefetch))
        app.router.add_get("/v1/jobs/{id}", admin(self.job))
        app.router.add_post("/v1/pin", admin(self.pin))
        app.router.add_delete("/v1/pin", admin(self.unpin))
        app.router.add_post("/v1/evict", admin(self.evict))
        app.router.add_post("/v1/verify", admin(self.verify))

    async def repos(self, _: web.Request) -> web.Response:
        return web.json_response({"repos": self.report.repos()})

    async def repo(self, request: web.Request) -> web.Response:
        name = request.match_info["repo"]
        repo_type = request.query.get("repo_type", "model")
        try:
            found = self.report.repo(validate_repo_type(repo_type), validate_repo_id(name))
        except InvalidName:  # no such repo can be in the cache
            found = None
        if found is not None:
            return web.json_response(found)
        raise web.HTTPNotFound(reason="not_found", text=f"{repo_type} {name!r} is not in the cache")

    async def status(self, _: web.Request) -> web.Response:
        return web.json_response(self.report.node())

    async def prefetch(self, request: web.Request) -> web.Response:
        """`{"fill": false}`: resolve only (the tree shows it, no byte is fetched): 200 with what it is."""
        body = await _body(request)
        spec = _spec(body)
        if body.get("fill", True) is False:
            return web.json_response(await self.ops.resolve(spec))
        job = await self.ops.prefetch(spec)
        return web.json_response(job.as_dict(), status=202)

    async def job(self, request: web.Request) -> web.Response:
        """`?wait=S`: answer when the job ends or after S seconds (<= 300), instead of polling."""
        j = self.ops.job(request.match_info["id"])
        if j is None:
            raise web.HTTPNotFound(reason="not_found", text=f"no job {request.match_info['id']!r}")
        wait = _seconds(request.query.get("wait", "0"), "wait")
        if wait and j.task is not None and not j.task.done():
            await asyncio.wait({j.task}, timeout=wait)
        return web.json_response(j.as_dict())

    async def pin(self, request: web.Request) -> web.Response:
        body = await _body(request)
        job = await self.ops.pin(_spec(body), str(body.get("mode", "pin")))
        return web.json_response(job.as_dict(), status=202)

    async def unpin(self, request: web.Request) -> web.Response:
        given = _spec(await _body(request))
        spec = given.at(given.rev)
        if not self.ops.unpin(spec):
            raise web.HTTPNotFound(reason="not_found", text=f"no pin for {spec}")
        return web.json_response({"unpinned": str(spec)})

    async def evict(self, request: web.Request) -> web.Response:
        body = await _body(request)
        spec = _spec(body, need_repo=False)
        if spec is None and body.get("all") is not True:
            raise ValueError("give 'repo' (and optionally 'revision'), or 'all': true")
        try:
            n, freed, kept = self.ops.evict(spec)
        except KeyError as e:
            raise not_found(e) from None
        return web.json_response({"evicted_blobs": n, "freed_bytes": freed, "kept_in_use_or_pinned": kept})

    async def verify(self, request: web.Request) -> web.Response:
        """Re-check stored bytes: {repo, revision?, repo_type?} or {} for the whole cache."""
        try:
            job = self.ops.verify(_spec(await _body(request), need_repo=False))
        except KeyError as e:
            raise not_found(e) from None
        return web.json_response(job.as_dict(), status=202)
