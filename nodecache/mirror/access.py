"""The mirror's one access decision (`Access.open`): every route asks it before it reveals anything.

The repo must be one a mirror request may make the node fetch (`mirror_allow`,
by default the node's `RepoPolicy`; else 404, nothing asked upstream). It is
resolved through its own source chain, which records its visibility in the
index. Public repos are open to everyone, gated repos' metadata too; anything
else needs the caller to prove access with its own token, by a request shaped
here and sent to the Hub the repo's chain starts with; positive answers are
remembered for `ACCESS_TTL`. A repo whose chain does not start at the Hub is
open only to the admin token or through `mirror_public`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from urllib.parse import quote

from aiohttp import web

from ..auth import bearer_matches
from ..catalog import Catalog
from ..config import Config
from ..expiring import Window
from ..index import Index
from ..upstream import VISIBILITIES, UpstreamError
from ..upstream.hf import HfUpstream
from ..upstream.sources import Sources
from .errors import HubError, relayed_error
from .paths import Target
from .rules import Grant, anonymous_refusal, matches, named_by, proof_needed
from .snapshots import Snapshots

ACCESS_TTL = 60.0  # a caller's access, proven upstream, is trusted this long
ACCESS_MAX = 10_000  # remembered (repo, caller) grants; beyond, expired ones are dropped
DOWN_WINDOW = 10.0  # after upstream failed us, uncached reads fail fast (504) for this long


class Access:
    """Proven grants, one upstream check per question at a time, and whether upstream answers lately."""

    def __init__(self, cfg: Config, catalog: Catalog, index: Index, sources: Sources, snapshots: Snapshots):
        self.cfg, self.catalog, self.index, self.sources, self.snapshots = cfg, catalog, index, sources, snapshots
        self._grants: dict[tuple[str, str, str, str], float] = {}  # (type, repo, auth hash, proof) -> until
        self._checking: dict[tuple[str, ...], asyncio.Task] = {}  # one upstream check per question at a time
        # Open while upstream failed a mirror call recently: uncached bytes fail fast.
        self.down = Window(DOWN_WINDOW)

    def hub_of(self, t: Target) -> HfUpstream | None:
        """The Hub the repo's bytes come from, if its chain starts there (else None: the operator's own)."""
        first = self.sources.for_repo(t.repo_type, t.repo_id)[0]
        return first if isinstance(first, HfUpstream) else None

    def allowed(self, t: Target) -> bool:
        """May a mirror request make the node resolve and fetch this repo? `mirror_allow`, or by
        default the node's own rule (`RepoPolicy`: the configured repos, `on_demand`, the index)."""
        allow = self.cfg.mirror_allow
        if allow is None:
            return self.catalog.may_fetch(t.repo_type, t.repo_id)
        return matches(allow, t.repo_type, t.repo_id)

    def named(self, t: Target) -> bool:
        """Named by the operator, not only matched by a wildcard."""
        allow = self.cfg.mirror_allow
        return self.catalog.policy.names(t.repo_type, t.repo_id) or named_by(allow or (), t.repo_type, t.repo_id)

    def _is_admin(self, auth: str | None) -> bool:
        token = self.cfg.admin_token
        return bool(token and auth) and bearer_matches(auth, token)

    async def open(self, request: web.Request, t: Target, path: str | None = None) -> Grant:
        """The one access decision of every route: a Grant, or the Hub-style refusal raised.

        `path` is the file a resolve route serves (its bytes need more than its
        metadata). The caller is cleared before any answer says whether a
        revision or a file exists.
        """
        auth = request.headers.get("Authorization") or None
        if auth is not None and not (auth.isascii() and auth.isprintable()):
            raise HubError(400, "the Authorization header must be printable ASCII")
        admin = self._is_admin(auth)
        if not admin and not self.allowed(t):
            raise HubError(404, f"Repository {t.repo_id} is not mirrored by this node (mirror_allow)", "RepoNotFound")
        # A repo matched only by a wildcard resolves only if the Hub calls it public (as a
        # lookup through the mount does): a private one would enter the index and the tree.
        public_only = not (admin or self.named(t) or self.index.snapshots.has_repo(t.repo_type, t.repo_id))
        try:
            ref, failed = await self.snapshots.resolve(t, public_only), None
        except HubError as e:
            ref, failed = None, e
        meta = self.index.repo_meta.get(t.repo_type, t.repo_id)
        if failed is not None and meta is None:  # never recorded: nothing to protect, nothing to tell
            if failed.status == 404:  # not which of repo, revision or visibility refused it
                raise HubError(404, f"Repository {t.repo_id} not found, or not public and not named", "RepoNotFound")
            raise failed
        visibility = (meta or {}).get("visibility", "unknown")
        hub = self.hub_of(t)
        if admin:
            why = "admin"
        elif matches(self.cfg.mirror_public, t.repo_type, t.repo_id):
            why = "mirror_public"
        elif hub is None:
            raise HubError(
                401,
                f"Repository {t.repo_id} is this node's own (not the Hub's): not public (mirror_public)",
                "RepoNotFound",
            )
        else:
            why = await self._check_caller(
                hub,
                t,
                auth,
                visibility if visibility in VISIBILITIES else "unknown",
                ref.commit if ref else t.revision,
                path,
            )
        if failed is not None:
            raise failed
        assert ref is not None
        relay = hub is not None and why in ("public", "caller")
        return Grant(ref, why, relay, auth if relay else None)

    async def _check_caller(
        self, hub: HfUpstream, t: Target, auth: str | None, visibility: str, revision: str, path: str | None
    ) -> str:
        """Why this caller may read the repo ("public", or "caller" once its Hub says so), or the refusal."""
        proof = proof_needed(visibility, path is not None)
        if proof is None:
            return "public"
        if auth is None:
            raise anonymous_refusal(t, visibility, path is not None)
        now = time.monotonic()
        key = (t.repo_type, t.repo_id, hashlib.sha256(auth.encode()).hexdigest())
        if self._grants.get((*key, "files"), 0.0) > now or self._grants.get((*key, proof), 0.0) > now:
            return "caller"
        if proof == "files":  # the Hub's gate is on the file route: ask for (the head of) the file itself
            method, url = "HEAD", f"/{t.spec.name}/resolve/{quote(revision, safe='')}/{quote(path or '')}"
        else:
            method, url = "GET", f"{t.api_base}/revision/{quote(revision, safe='')}"
        ask = (*key, method, url)
        task = self._checking.get(ask)
        if task is None:
            task = self._checking[ask] = asyncio.get_running_loop().create_task(
                hub.api(method, url, authorization=auth)
            )
            task.add_done_callback(lambda _: self._checking.pop(ask, None))
        try:
            status, headers, body = await asyncio.shield(task)
        except UpstreamError as e:
            self.down.open()
            raise HubError(503, f"cannot check access to {t.repo_id} now: {e}", headers={"Retry-After": "10"}) from None
        if status in (401, 403, 404):
            raise relayed_error(status, headers, body)
        if not 200 <= status < 400:
            self.down.open()
            raise HubError(
                503,
                f"cannot check access to {t.repo_id} now: upstream answered {status}",
                headers={"Retry-After": "10"},
            )
        self.down.close()
        if len(self._grants) >= ACCESS_MAX:
            self._grants = {k: v for k, v in self._grants.items() if v > now}
            if len(self._grants) >= ACCESS_MAX:
                self._grants.clear()
        self._grants[(*key, proof)] = now + ACCESS_TTL
        return "caller"
