"""The CSI node plugin: Identity + Node over a unix socket, bind-mounting the nodecache mount read-only.

Stateless on purpose: what is published where is read from /proc/self/mountinfo
on every call, so a restarted plugin (or daemon) picks up where it was.

Volume context (`volumeAttributes` of a PV, or `volumeAttributes` of an inline
CSI volume):
  model         `org/name` (or `datasets/org/name`): publish `hub/models--org--name`;
                absent: publish the whole `hub/` (only with --allow-whole-cache)
  revision      the daemon resolves and prefetches it (in the background)
  waitForCache  "true": return only once every byte of the model is cached and
                verified, or UNAVAILABLE after --wait-timeout so kubelet retries

Who may mount what is the policy's (policy.py), decided from the pod's namespace
and service account that kubelet adds (CSIDriver `podInfoOnMount: true`) and the
repo's visibility as the daemon recorded it; a refusal is PERMISSION_DENIED.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc

from .. import __version__, control, mounts
from ..layout import RepoSpec
from . import compilecache
from . import policy as policy_mod
from .errors import CsiError
from .policy import Policy, PolicyFile
from .proto import load
from .volume import POD_NAMESPACE, POD_SERVICE_ACCOUNT, check_request, model_volume

log = logging.getLogger(__name__)

pb, pb_grpc = load()

DRIVER_NAME = "nodecache.csi.k8s.io"
FUSE_SOURCE = "nodecache"  # fsname= of the daemon's FUSE mount


def parse_endpoint(endpoint: str) -> str:
    """`unix:///abs/path`, `unix:/abs/path`, `unix://abs/path` (relative) or a bare path -> path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif "://" in endpoint:
        raise ValueError(f"unsupported CSI endpoint {endpoint!r}: only unix sockets")
    else:
        path = endpoint
    if not path:
        raise ValueError(f"empty socket path in CSI endpoint {endpoint!r}")
    return os.path.abspath(path)


def _who(context: dict[str, str]) -> str:
    """The pod as refusals name it: its namespace, and its service account when kubelet gave it."""
    namespace, account = context.get(POD_NAMESPACE, ""), context.get(POD_SERVICE_ACCOUNT, "")
    who = f"namespace {namespace!r}" if namespace else "a pod of unknown namespace"
    return who + (f" (service account {account!r})" if account else "")


def not_public(context: dict[str, str], repo: str, why: str, policy: Policy) -> CsiError:
    """The refusal of a repo that a PUBLIC grant does not cover. Private, gated and unknown repos get the same
    answer as a repo that does not exist, as the Hub answers strangers: the pod's events must not tell which
    private names exist. The plugin's log (the node's admins) says which it was."""
    who = _who(context)
    log.info("%s asked for %s, which is %s: refused (its grant is public repos only)", who, repo, why)
    fix = (
        f"if it is private or gated, list it under privateRepos of a rule for this namespace in {policy.origin}"
        if policy.needs_pod_info
        else "if it is private or gated, give the CSI plugin a --policy whose privateRepos allow it here"
    )
    return CsiError(
        grpc.StatusCode.PERMISSION_DENIED,
        f"{who} may mount {repo} only if it is a public repo, and it is not one or does not exist: {fix}",
    )


class Driver:
    """The node plugin's logic, callable without gRPC (the servicers are thin)."""

    def __init__(
        self,
        mount: Path,
        node_id: str,
        daemon_url: str = "http://127.0.0.1:8470",
        kubelet_dir: str = "/var/lib/kubelet",
        wait_timeout: float = 90.0,
        probe_timeout: float = 5.0,
        admin_token: str | None = None,
        policy: PolicyFile | None = None,
        allow_whole_cache: bool = False,
    ):
        self.mount = os.path.abspath(mount)
        self.hub = os.path.join(self.mount, "hub")
        self.node_id = node_id
        self.daemon_url = daemon_url.rstrip("/")
        self.kubelet_pods = os.path.join(os.path.abspath(kubelet_dir), "pods") + "/"
        self.wait_timeout = wait_timeout
        self.probe_timeout = probe_timeout
        self.admin_token = admin_token
        self.policy_file = policy  # None: policy.DEFAULT (public repos only)
        self.allow_whole_cache = allow_whole_cache
        self.poll_interval = 0.5
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._devs: set[str] = set()  # every device seen serving at self.mount: its binds are ours
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- helpers -------------------------------------------------------------

    @contextlib.contextmanager
    def claim(self, target: str, wait: bool = False) -> Iterator[bool]:
        """One operation per target at a time; another one in flight -> ABORTED (or False if not raising)."""
        with self._busy_lock:
            if target in self._busy:
                if wait:
                    yield False
                    return
                raise CsiError(grpc.StatusCode.ABORTED, f"an operation on {target} is already in flight")
            self._busy.add(target)
        try:
            yield True
        finally:
            with self._busy_lock:
                self._busy.discard(target)

    def live_mount(self, entries: list[mounts.MountEntry] | None = None) -> mounts.MountEntry | None:
        """The daemon's FUSE mount at self.mount if it is there and answering, else None."""
        top = mounts.top(self.mount, entries)
        if top is None or not top.is_fuse or top.source != FUSE_SOURCE:
            return None
        if mounts.probe(self.hub, self.probe_timeout) != 0:
            return None
        self._devs.add(top.dev)
        return top

    def clean_stale_mount(self) -> bool:
        """A daemon that died without unmounting leaves a dead FUSE mount (ENOTCONN): detach it."""
        top = mounts.top(self.mount)
        if top is None or not top.is_fuse or top.source != FUSE_SOURCE:
            return False
        err = mounts.probe(self.mount, self.probe_timeout)
        if err not in mounts.STALE_ERRNOS:
            return False
        log.warning("detaching a stale mount at %s (%s)", self.mount, os.strerror(err))
        self._devs.add(top.dev)  # binds of it are ours to re-bind once a daemon is back
        mounts.unmount_all(self.mount)
        return True

    def _api(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call to the daemon's control API; errors become CSI status codes."""
        try:
            return control.call(self.daemon_url, method, path, body, self.admin_token, 30, self._http.open)
        except control.ApiError as e:
            if e.status is None:
                raise CsiError(
                    grpc.StatusCode.UNAVAILABLE, f"daemon at {self.daemon_url} not reachable: {e.cause}"
                ) from None
            code = {
                404: grpc.StatusCode.NOT_FOUND,
                400: grpc.StatusCode.INVALID_ARGUMENT,
                507: grpc.StatusCode.RESOURCE_EXHAUSTED,
            }.get(e.status)
            detail = e.detail
            if e.status in (401, 403):
                detail = f"{detail} (give the CSI plugin the daemon's admin token: --admin-token-file)"
            raise CsiError(code or grpc.StatusCode.UNAVAILABLE, f"daemon answered {e.status}: {detail}") from None

    def _start_prefetch(self, repo_type: str, repo_id: str, revision: str | None) -> dict:
        """Have the daemon resolve a repo (and fill it in the background): its prefetch job."""
        return self._api("POST", "/v1/prefetch", {"repo": repo_id, "repo_type": repo_type, "revision": revision})

    def _wait_job(self, repo_id: str, job: dict, start: float) -> None:
        """Until every byte of the job's snapshot is verified, or UNAVAILABLE after wait_timeout (kubelet retries)."""
        while job.get("state") == "running":
            if time.monotonic() - start >= self.wait_timeout:
                raise CsiError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{repo_id} not fully cached after {self.wait_timeout:.0f}s "
                    f"({job.get('done')}/{job.get('total')} bytes); kubelet will retry",
                )
            time.sleep(min(self.poll_interval, max(0.0, self.wait_timeout - (time.monotonic() - start))))
            job = self._api("GET", f"/v1/jobs/{job['id']}")
        if job.get("state") != "ready":
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"filling {repo_id} failed: {job.get('error')}")

    def _visibility(self, repo_type: str, repo_id: str) -> str | None:
        """What the daemon recorded of the repo's source: public, gated, private, unknown; None if not resolved yet."""
        query = "" if repo_type == "model" else f"?repo_type={repo_type}"
        try:
            info = self._api("GET", f"/v1/repos/{repo_id}{query}")
        except CsiError as e:
            if e.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        visibility = info.get("visibility")
        return visibility if isinstance(visibility, str) else "unknown"

    # -- policy --------------------------------------------------------------

    def policy(self) -> Policy:
        return policy_mod.DEFAULT if self.policy_file is None else self.policy_file.current()

    def authorize(self, context: dict[str, str], repo: tuple[str, str] | None) -> tuple[str, Policy]:
        """The pod's grant for `repo` (None: the whole hub/), ANY or PUBLIC, and the policy that gave it;
        else PERMISSION_DENIED."""
        namespace = context.get(POD_NAMESPACE, "")
        account = context.get(POD_SERVICE_ACCOUNT, "")
        what = "the whole hub/" if repo is None else RepoSpec(*repo).name
        who = _who(context)
        if repo is None and not self.allow_whole_cache:
            raise CsiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} may not publish {what}: it holds every repo on this node, private ones included, "
                "and is off unless the CSI plugin runs with --allow-whole-cache; name a model instead "
                "(volumeAttributes: {model: org/name})",
            )
        policy = self.policy()
        if policy.broken is not None:
            raise CsiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} may not publish {what}: the CSI policy {policy.origin} has never loaded "
                f"({policy.broken}), so every volume is refused until it does",
            )
        if policy.needs_pod_info and not namespace:
            raise CsiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who} may not publish {what}: the volume context has no {POD_NAMESPACE}, which the policy "
                f"{policy.origin} needs (the CSIDriver object must set podInfoOnMount: true)",
            )
        if repo is None:
            if not policy.whole_cache(namespace, account):
                raise CsiError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{who} may not publish {what}: no rule of {policy.origin} with wholeCache: true applies to it",
                )
            return policy_mod.ANY, policy
        grant = policy.grant(namespace, account, *repo)
        if grant is None:
            raise CsiError(
                grpc.StatusCode.PERMISSION_DENIED, f"{who} may not mount {what}: no rule of {policy.origin} allows it"
            )
        return grant, policy

    # -- Node ----------------------------------------------------------------

    def publish(
        self, volume_id: str, target_path: str, capability, volume_context: dict[str, str], has_capability: bool
    ) -> None:
        """Always read-only for a model volume: check the request, authorize it, prepare the repo
        through the daemon, bind its folder."""
        target = check_request(volume_id, target_path, capability, has_capability)
        kind = volume_context.get("kind", "model")
        if kind == compilecache.KIND:  # a writable per-key directory on local disk (issue 19)
            return compilecache.publish(self, volume_id, target, volume_context, POD_NAMESPACE)
        if kind != "model":
            raise CsiError(
                grpc.StatusCode.INVALID_ARGUMENT, f'kind must be "model" or "{compilecache.KIND}", not {kind!r}'
            )
        vol = model_volume(volume_context)
        with self.claim(target):
            try:
                grant, policy = self.authorize(volume_context, vol.repo)
            except CsiError:
                self._remove_target(target)
                raise
            fuse = self.live_mount()
            if fuse is None:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"the nodecache daemon is not serving at {self.mount}")
            source = self.hub if vol.repo is None else os.path.join(self.hub, vol.folder)
            if vol.repo is not None:
                try:
                    self._prepare(source, *vol.repo, vol.revision, vol.wait, grant, policy, volume_context)
                except CsiError as e:
                    if e.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
                        self._remove_target(target)
                    raise
            self._bind(volume_id, source, target, fuse)

    def _bind(self, volume_id: str, source: str, target: str, fuse) -> None:
        """Bind `source` read-only at `target`, unless it is there already; over the same directory
        of a dead daemon, a live bind is stacked on top (see reconcile)."""
        want_root = "/" + os.path.relpath(source, self.mount)
        top = mounts.top(target, mounts.mountinfo())
        if top is not None:
            if top.dev == fuse.dev and top.root == want_root:
                if not top.readonly:  # not ours; make it so
                    mounts.bind_readonly(source, target)
                log.info("publish %s -> %s: already published", volume_id, target)
                return
            if not (top.is_fuse and top.source == FUSE_SOURCE and top.root == want_root):
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"{target} already has another volume mounted ({top.source}:{top.root})",
                )
        else:
            try:
                os.makedirs(target, exist_ok=True)
            except OSError as e:
                raise CsiError(grpc.StatusCode.INTERNAL, f"cannot create {target}: {e}") from None
        try:
            mounts.bind_readonly(source, target)
        except OSError as e:
            raise CsiError(grpc.StatusCode.INTERNAL, f"bind {source} -> {target}: {e}") from None
        log.info("publish %s: %s -> %s (read-only)", volume_id, source, target)

    def _prepare(
        self,
        source: str,
        repo_type: str,
        repo_id: str,
        revision: str | None,
        wait: bool,
        grant: str,
        policy: Policy,
        context: dict[str, str],
    ) -> None:
        """Resolve (and fill) the repo through the daemon as needed; a PUBLIC grant is checked before any wait."""
        start = time.monotonic()
        name = RepoSpec(repo_type, repo_id).name
        public_only = grant == policy_mod.PUBLIC
        visibility = self._visibility(repo_type, repo_id) if public_only else None
        if visibility not in (None, "public"):  # known already: refused before anything is fetched
            raise not_public(context, name, visibility, policy)
        if public_only and visibility is None:  # resolve only (no byte fetched): its source says what it is
            try:
                resolved = self._api(
                    "POST",
                    "/v1/prefetch",
                    {"repo": repo_id, "repo_type": repo_type, "revision": revision, "fill": False},
                )
            except CsiError as e:
                if e.code == grpc.StatusCode.NOT_FOUND:
                    raise not_public(context, name, "not found", policy) from None
                raise
            visibility = resolved.get("visibility") if isinstance(resolved, dict) else None
            if visibility != "public":
                raise not_public(context, name, visibility or "unknown", policy)
        present = mounts.probe(source, self.probe_timeout) == 0
        if not (revision or wait or not present):
            return
        try:
            job = self._start_prefetch(repo_type, repo_id, revision)
        except CsiError as e:
            # Larger than the node's cache (resolved, never filled whole): published all the same,
            # read lazily; only a pod that asked to wait for every byte is refused (it never could).
            if wait or e.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            log.warning("%s: %s", name, e)
        else:
            if wait:
                self._wait_job(repo_id, job, start)
        err = mounts.probe(source, self.probe_timeout)
        if err == errno.ENOENT:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"model {name} is not in the cache tree")
        if err:
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"{source}: {os.strerror(err)}")

    def _remove_target(self, target: str) -> None:
        if mounts.at(target):
            return
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
            os.rmdir(target)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        if not volume_id:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "volume_id is required")
        if not target_path:
            raise CsiError(grpc.StatusCode.INVALID_ARGUMENT, "target_path is required")
        target = os.path.normpath(os.path.abspath(target_path))
        with self.claim(target):
            if compilecache.is_compile_cache(target):
                compilecache.release(self, target)  # first: if the daemon cannot be told, kubelet retries
            try:
                n = mounts.unmount_all(target)
            except OSError as e:
                raise CsiError(grpc.StatusCode.INTERNAL, f"unmount {target}: {e}") from None
            try:
                os.rmdir(target)
            except FileNotFoundError:
                pass
            except NotADirectoryError:
                os.unlink(target)
            except OSError as e:
                raise CsiError(grpc.StatusCode.INTERNAL, f"remove {target}: {e}") from None
            log.info("unpublish %s: %s (%d mount(s) removed)", volume_id, target, n)

    # -- daemon restarts -----------------------------------------------------

    def reconcile(self) -> list[str]:
        """Re-bind every published target whose bind points at a dead daemon onto the live mount.

        The fallback for a lost connection: with nodecache-keeper holding it, a daemon restart
        leaves every bind alive and there is nothing to do here (a held, unserved mount probes
        as a timeout, never as dead). It is lost when the keeper is gone with the daemon, or on
        a reboot. The new bind is stacked on top of the dead one rather than replacing it:
        a mount event on the target propagates into containers that mounted the
        volume with `mountPropagation: HostToContainer`; an unmount + bind would
        not, they would keep the dead one (ENOTCONN) until the pod restarts.
        """
        entries = mounts.mountinfo()
        fuse = self.live_mount(entries)
        if fuse is None:
            return []
        live = {e.dev for e in entries if e.root == "/" and e.is_fuse}  # devices some daemon still serves
        tops: dict[str, mounts.MountEntry] = {}
        for e in entries:
            tops[e.mountpoint] = e
        done = []
        for target, e in tops.items():
            if target == self.mount or not (e.is_fuse and e.source == FUSE_SOURCE):
                continue
            if e.dev == fuse.dev or e.dev in live or not (e.root == "/hub" or e.root.startswith("/hub/")):
                continue
            if e.dev not in self._devs and not target.startswith(self.kubelet_pods):
                continue  # not a bind of ours (another daemon's, on a test machine)
            with self.claim(target, wait=True) as mine:
                if not mine:
                    continue  # kubelet is working on it right now
                source = self.mount + e.root
                if mounts.probe(source, self.probe_timeout) != 0:
                    log.warning("reconcile: %s is gone from the new mount; leaving %s", source, target)
                    continue
                try:
                    mounts.bind_readonly(source, target)
                except OSError as err:
                    log.warning("reconcile: re-bind %s -> %s failed: %s", source, target, err)
                    continue
                log.info("reconcile: re-bound %s -> %s after a daemon restart", source, target)
                done.append(target)
        return done

    def watch(self, stop: threading.Event, interval: float = 2.0) -> None:
        """Reconcile on every mount-table change (POLLPRI on mountinfo) and every `interval` seconds; keep the
        daemon's record of compile-cache users true to the mount table."""
        users = compilecache.UserSync(self, self.kubelet_pods)
        with open("/proc/self/mountinfo", "rb") as f:
            poller = select.poll()
            poller.register(f, select.POLLPRI | select.POLLERR)
            while not stop.is_set():
                try:
                    self.clean_stale_mount()  # a crashed daemon's dead mount: gone before its restart
                    self.reconcile()
                    users.run()
                except Exception:  # never let the watcher die
                    log.exception("reconcile failed")
                poller.poll(interval * 1000)
                f.seek(0)
                f.read()  # re-arm: the next change is reported again


def _guard(fn: Callable) -> Callable:
    """Map CsiError to its status code, anything else to INTERNAL; never a traceback to the CO."""

    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except CsiError as e:
            log.info("%s: %s %s", fn.__name__, e.code.name, e)
            context.abort(e.code, str(e))
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{e.__class__.__name__}: {e}")

    wrapper.__name__ = fn.__name__
    return wrapper


class IdentityServicer(pb_grpc.IdentityServicer):
    def __init__(self, driver: Driver):
        self.driver = driver

    @_guard
    def GetPluginInfo(self, request, context):
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @_guard
    def GetPluginCapabilities(self, request, context):
        return pb.GetPluginCapabilitiesResponse(capabilities=[])  # node plugin only: no controller service

    @_guard
    def Probe(self, request, context):
        from google.protobuf.wrappers_pb2 import BoolValue

        return pb.ProbeResponse(ready=BoolValue(value=self.driver.live_mount() is not None))


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, driver: Driver):
        self.driver = driver

    @_guard
    def NodeGetCapabilities(self, request, context):
        return pb.NodeGetCapabilitiesResponse(capabilities=[])  # no staging, no stats, no expansion

    @_guard
    def NodeGetInfo(self, request, context):
        return pb.NodeGetInfoResponse(node_id=self.driver.node_id)

    @_guard
    def NodePublishVolume(self, request, context):
        self.driver.publish(
            request.volume_id,
            request.target_path,
            request.volume_capability,
            dict(request.volume_context),
            request.HasField("volume_capability"),
        )
        return pb.NodePublishVolumeResponse()

    @_guard
    def NodeUnpublishVolume(self, request, context):
        self.driver.unpublish(request.volume_id, request.target_path)
        return pb.NodeUnpublishVolumeResponse()


def serve(driver: Driver, endpoint: str, stop: threading.Event | None = None, workers: int = 8) -> None:
    """Serve on the unix socket until `stop` is set (or SIGTERM/SIGINT when run from the CLI)."""
    path = parse_endpoint(endpoint)
    if os.path.exists(path) or os.path.islink(path):
        if not Path(path).is_socket():
            raise OSError(errno.EEXIST, "exists and is not a socket", path)
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            try:
                s.connect(path)
            except OSError:
                os.unlink(path)  # stale: left by a plugin that is gone
            else:
                raise OSError(errno.EADDRINUSE, "in use by a running CSI plugin", path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stop = stop or threading.Event()
    driver.clean_stale_mount()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csi"))
    pb_grpc.add_IdentityServicer_to_server(IdentityServicer(driver), server)
    pb_grpc.add_NodeServicer_to_server(NodeServicer(driver), server)
    server.add_insecure_port("unix://" + path)
    server.start()
    watcher = threading.Thread(target=driver.watch, args=(stop,), name="csi-reconcile", daemon=True)
    watcher.start()
    log.info("CSI %s %s on unix://%s, node %s, mount %s", DRIVER_NAME, __version__, path, driver.node_id, driver.mount)
    try:
        while not stop.wait(0.5):  # timed: a signal caught by another thread must not go unnoticed
            pass
        log.info("stopping")
    finally:
        server.stop(grace=5).wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
