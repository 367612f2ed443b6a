"""What a NodePublishVolume asks for, checked before anything on the node is touched (pure)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

from ..layout import InvalidName, RepoSpec, repo_folder_name
from .errors import CsiError

CONTEXT_KEYS = {"model", "revision", "waitForCache", "kind"}
KUBELET_KEY_PREFIX = "csi.storage.k8s.io/"  # pod info and the ephemeral flag, added by kubelet
POD_NAMESPACE = KUBELET_KEY_PREFIX + "pod.namespace"  # kubelet overwrites any value a pod spec gives
POD_SERVICE_ACCOUNT = KUBELET_KEY_PREFIX + "serviceAccount.name"
TRUE = {"true", "yes", "1"}
FALSE = {"false", "no", "0", ""}


def _invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_request(volume_id: str, target_path: str, capability, has_capability: bool) -> str:
    """The request's target, normalized; INVALID_ARGUMENT if the request is not one we serve.
    Any access mode is fine (kubelet sends SINGLE_NODE_WRITER for inline volumes)."""
    if not volume_id:
        raise _invalid("volume_id is required")
    if not target_path:
        raise _invalid("target_path is required")
    if not has_capability:
        raise _invalid("volume_capability is required")
    if capability.HasField("block"):
        raise _invalid("block volumes are not supported: nodecache is a filesystem")
    if not capability.HasField("mount"):
        raise _invalid("volume_capability needs access_type mount")
    if not capability.HasField("access_mode"):
        raise _invalid("volume_capability.access_mode is required")
    if not os.path.isabs(target_path):
        raise _invalid(f"target_path must be absolute: {target_path!r}")
    return os.path.normpath(target_path)


@dataclass(frozen=True)
class ModelVolume:
    """A `kind: model` volume: one repo's folder (at a revision, maybe waited for), or all of `hub/`."""

    repo: tuple[str, str] | None  # (repo_type, repo_id); None: the whole hub
    folder: str  # the repo's folder under hub/ ("" for the whole hub)
    revision: str | None
    wait: bool


def model_volume(context: dict[str, str]) -> ModelVolume:
    """The model volume the context describes; INVALID_ARGUMENT for an attribute it may not have."""
    unknown = {k for k in context if k not in CONTEXT_KEYS and not k.startswith(KUBELET_KEY_PREFIX)}
    if unknown:
        raise _invalid(f"unknown volume attribute(s) {sorted(unknown)}; known: {sorted(CONTEXT_KEYS)}")
    model = context.get("model", "")
    revision = context.get("revision") or None
    wait_s = context.get("waitForCache", "").strip().lower()
    if wait_s not in TRUE | FALSE:
        raise _invalid(f'waitForCache must be "true" or "false", not {wait_s!r}')
    wait = wait_s in TRUE
    if not model:
        if revision or wait:
            raise _invalid("revision/waitForCache need a model")
        return ModelVolume(None, "", None, False)
    try:
        spec = RepoSpec.parse(model)
        if revision and spec.revision is not None:
            raise InvalidName(f"model {model!r} names a revision and so does revision {revision!r}")
        repo = spec.at(revision).repo
        return ModelVolume(repo, repo_folder_name(*repo), revision, wait)
    except InvalidName as e:
        raise _invalid(str(e)) from None
