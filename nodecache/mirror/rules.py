"""Who may see what through the mirror (pure): the globs, the proof a caller owes, the refusals."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ..layout import RepoSpec
from ..repos import RepoRef
from .errors import HubError
from .paths import Target


def repo_name(repo_type: str, repo_id: str) -> str:
    """`org/name`, `datasets/org/name`: what `mirror_allow` and `mirror_public` globs match."""
    return RepoSpec(repo_type, repo_id).name


def matches(globs, repo_type: str, repo_id: str) -> bool:
    name = repo_name(repo_type, repo_id)
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def named_by(globs, repo_type: str, repo_id: str) -> bool:
    """Listed by its exact name (a glob without wildcards): private repos need this."""
    name = repo_name(repo_type, repo_id)
    return any(g == name for g in globs if not any(c in g for c in "*?["))


def proof_needed(visibility: str, files: bool) -> str | None:
    """What a caller must prove to the Hub: None (nothing), "meta" (it sees the repo) or "files".

    Gated repos' metadata is public and their files are not; a repo not known
    to be public or gated is treated as private.
    """
    if visibility == "public" or (visibility == "gated" and not files):
        return None
    return "files" if files else "meta"


def anonymous_refusal(t: Target, visibility: str, files: bool) -> HubError:
    """The Hub's own answer to a caller without a token (huggingface_hub maps the codes to its errors)."""
    kind = t.repo_type
    if visibility == "gated" and files:
        return HubError(401, f"Access to {kind} {t.repo_id} is restricted. You must be authenticated.", "GatedRepo")
    return HubError(401, f"Repository {t.repo_id} not found, or it needs a token with access", "RepoNotFound")


@dataclass(frozen=True)
class Grant:
    """One request's access: the revision it reads, why it may, and what may be relayed upstream."""

    ref: RepoRef
    why: str  # "public" | "caller" (proven upstream) | "admin" | "mirror_public"
    relay: bool  # API answers may come from the Hub (the repo's chain starts there)
    auth: str | None  # the Authorization to relay: the caller's own, never the admin token
