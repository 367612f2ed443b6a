"""The `kind: compile-cache` volume: a read-write bind of the daemon's per-key directory on local disk.

The daemon owns the directories (quota, sealing, filling from peers): the
plugin asks it for the key's tree (`POST /v1/compile-caches/acquire`), binds
it `rw,nosuid,nodev` at the target, and tells it when the target goes
(`release`), so a key a pod uses is never evicted.

Keys are per namespace: the daemon's key is `<pod namespace>/<key>`, so a pod
can never read or write another namespace's compiled kernels (they are code
its GPU processes will run).

The plugin's watch loop also keeps the daemon's record of which targets use a
key true to the mount table (`UserSync`): a bind the daemon does not know of
(its state lost or restored from an old copy) is told to it, so that key is
not evicted or swapped under a pod; a target under kubelet's pods dir that the
daemon counts but that is not bound (an unpublish it never heard of) is
released, so the key can be evicted again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import grpc

from .. import ccmanifest as cm
from .. import mounts
from .errors import CsiError


class Driver(Protocol):
    """What publishing a compile cache needs of the CSI driver."""

    claim: Callable[[str], AbstractContextManager]
    _api: Callable[..., dict]


log = logging.getLogger(__name__)

KIND = "compile-cache"
KEYS = {"kind", "key"}  # the only attributes of this kind (besides kubelet's own)


def scoped_key(context: dict[str, str], namespace_key: str) -> str:
    """The daemon's key for a volume: the pod's namespace, then the user's free text."""
    unknown = {k for k in context if k not in KEYS and not k.startswith("csi.storage.k8s.io/")}
    if unknown:
        raise CsiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"unknown volume attribute(s) {sorted(unknown)} for kind {KIND}; known: {sorted(KEYS)}",
        )
    namespace = context.get(namespace_key, "")
    if not namespace:
        raise CsiError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"a {KIND} volume needs {namespace_key} in its volume context (the CSIDriver must set "
            "podInfoOnMount: true): compile caches are kept per namespace",
        )
    try:
        return cm.check_key(f"{namespace}/{cm.check_key(context.get('key'))}")
    except cm.BadKey as e:
        raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, f"attribute 'key': {e}") from None


def publish(driver: Driver, volume_id: str, target: str, context: dict[str, str], namespace_key: str) -> None:
    key = scoped_key(context, namespace_key)
    with driver.claim(target):
        got = driver._api("POST", "/v1/compile-caches/acquire", {"key": key, "target": target})
        source = got.get("path") if isinstance(got, dict) else None
        if not isinstance(source, str) or not os.path.isabs(source):
            raise CsiError(grpc.StatusCode.INTERNAL, f"the daemon answered no directory for {key!r}: {got!r}")
        top = mounts.top(target)
        if top is not None:
            if not top.is_fuse and _same_dir(source, target):
                log.info("publish %s -> %s: compile cache already published", volume_id, target)
                return
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS, f"{target} already has another volume mounted ({top.source}:{top.root})"
            )
        try:
            os.makedirs(target, exist_ok=True)
            mounts.bind_writable(source, target)
        except OSError as e:
            with contextlib.suppress(CsiError):
                release(driver, target)
            raise CsiError(grpc.StatusCode.INTERNAL, f"bind {source} -> {target}: {e}") from None
        log.info("publish %s: compile cache %r (%s) -> %s (read-write)", volume_id, key, got.get("filled"), target)


def _same_dir(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def release(driver: Driver, target: str) -> None:
    """Tell the daemon the target no longer uses its key. Called before the unmount: if the daemon cannot
    be told, the unpublish fails (UNAVAILABLE) with the volume still mounted, and kubelet retries it."""
    driver._api("POST", "/v1/compile-caches/release", {"target": target})


def is_compile_cache(target: str) -> bool:
    """A non-FUSE bind at the target: ours are the compile caches (model volumes are binds of the FUSE mount)."""
    return any(not e.is_fuse for e in mounts.at(target))


TREE_ROOT_RE = re.compile(r".*/keys/([0-9a-f]{32})/tree")  # a bind of a key's tree, as mountinfo shows its root


def bound(kubelet_pods: str, entries: list[mounts.MountEntry]) -> dict[str, str]:
    """target -> key directory name of every compile-cache bind under kubelet's pods dir."""
    out = {}
    for e in entries:
        match = TREE_ROOT_RE.fullmatch(e.root)
        if not e.is_fuse and match and e.mountpoint.startswith(kubelet_pods):
            out[e.mountpoint] = match.group(1)
    return out


class UserSync:
    """One pass per call of the plugin's watch loop; each change made under the target's claim, after
    reading the mount table again, so it never races a publish or unpublish of the same target."""

    def __init__(self, driver: Driver, kubelet_pods: str):
        self.driver = driver
        self.kubelet_pods = kubelet_pods
        self.failing = False
        self.warned: set[str] = set()

    def run(self) -> tuple[list[str], list[str]]:
        """-> (targets told to the daemon, targets released)."""
        try:
            known = self.driver._api("GET", "/v1/compile-caches/users")["users"]
            out = self._sync(known if isinstance(known, dict) else {})
        except (CsiError, KeyError, TypeError) as e:
            if not self.failing:  # the daemon restarting is normal: one line, not one per pass
                log.warning("compile-cache user sync: %s", e)
            self.failing = True
            return [], []
        if self.failing:
            log.info("compile-cache user sync: daemon answering again")
        self.failing = False
        return out

    def _sync(self, known: dict) -> tuple[list[str], list[str]]:
        told, released = [], []
        now = bound(self.kubelet_pods, mounts.mountinfo())
        for target, name in now.items():
            if known.get(target) == name:
                continue
            with self.driver.claim(target, wait=True) as mine:
                if not mine or bound(self.kubelet_pods, mounts.mountinfo()).get(target) != name:
                    continue
                try:
                    self.driver._api("POST", "/v1/compile-caches/adopt", {"name": name, "target": target})
                except CsiError as e:
                    if e.code != grpc.StatusCode.NOT_FOUND:
                        raise
                    if target not in self.warned:  # its directory is not the daemon's any more: said once
                        log.warning("compile-cache user sync: %s is bound to a key the daemon lacks: %s", target, e)
                        self.warned.add(target)
                    continue
                log.info("compile-cache user sync: told the daemon %s uses %s", target, name)
                told.append(target)
        for target in known:
            if target in now or not isinstance(target, str) or not target.startswith(self.kubelet_pods):
                continue
            with self.driver.claim(target, wait=True) as mine:
                if not mine or target in bound(self.kubelet_pods, mounts.mountinfo()):
                    continue
                release(self.driver, target)
                log.info("compile-cache user sync: %s is not bound; released", target)
                released.append(target)
        return told, released
