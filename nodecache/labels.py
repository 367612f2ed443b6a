"""Node labels: let the scheduler prefer nodes that already hold a model, fully cached.

A repo whose snapshot is complete (every blob stored and hash-verified) gets
`nodecache.io/<16 hex of sha256("<type>/<org>/<name>")>=ready` on this node;
the label goes away when that is no longer true (evicted, new revision). Only
our own `nodecache.io/` keys are ever touched. Needs `patch` on nodes (the
`daemonset/node-labels` overlay grants exactly that).
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from pathlib import Path

import aiohttp

from .tokenfile import read_secret

log = logging.getLogger(__name__)

PREFIX = "nodecache.io/"
_SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def label_key(repo_type: str, repo_id: str) -> str:
    """`nodecache.io/<hash>`: repo ids can hold characters label names cannot."""
    return PREFIX + hashlib.sha256(f"{repo_type}/{repo_id}".encode()).hexdigest()[:16]


class NodeLabeler:
    """Keeps this node's `nodecache.io/*` labels equal to the set of ready repos."""

    def __init__(
        self, api: str, node: str, token: str | None, session: aiohttp.ClientSession, ca_file: str | None = None
    ):
        self.url = f"{api.rstrip('/')}/api/v1/nodes/{node}"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = session
        self.ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._applied: set[str] | None = None  # what the node carries, as far as we know

    @classmethod
    def from_config(cls, cfg, session: aiohttp.ClientSession) -> NodeLabeler | None:
        """In-cluster (service account) unless kube_api is given; None when there is no node name."""
        if not cfg.node_name:
            return None
        try:
            if cfg.kube_api:
                token = read_secret(cfg.kube_token_file) if cfg.kube_token_file else None
                return cls(cfg.kube_api, cfg.node_name, token, session)
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host or not (_SA / "token").exists():
                log.warning("node_name is set but there is no Kubernetes API here; node labels are off")
                return None
            token = read_secret(_SA / "token")
        except ValueError as e:  # labels are an aid to the scheduler: never a reason not to serve
            log.error("node labels are off: %s", e)
            return None
        return cls(f"https://{host}:{port}", cfg.node_name, token, session, str(_SA / "ca.crt"))

    async def sync(self, ready: set[str]) -> bool:
        """Patch only what differs; returns whether a patch was sent."""
        if self._applied is None:
            async with self.session.get(self.url, headers=self.headers, ssl=self.ssl) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"GET node: HTTP {resp.status}")
                labels = (await resp.json()).get("metadata", {}).get("labels", {}) or {}
            self._applied = {k for k in labels if k.startswith(PREFIX)}
        if ready == self._applied:
            return False
        patch = {k: "ready" for k in ready - self._applied} | {k: None for k in self._applied - ready}
        headers = {**self.headers, "Content-Type": "application/merge-patch+json"}
        body = {"metadata": {"labels": patch}}
        async with self.session.patch(self.url, json=body, headers=headers, ssl=self.ssl) as resp:
            if resp.status != 200:
                self._applied = None  # re-read next time
                raise RuntimeError(f"PATCH node labels: HTTP {resp.status}")
        log.info("node labels: %d ready (%+d)", len(ready), len(ready) - len(self._applied))
        self._applied = set(ready)
        return True
