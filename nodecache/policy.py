"""Which repos this node fetches on someone else's behalf (pure: no I/O).

A lookup through the mount, a peer or a mirror request can name any repo; only
repos the operator named (`repos`, `preload`, `sources`) or allowed by glob
(`on_demand`) may make the node resolve and fetch them upstream with its own
credentials. Globs match the spec form `[datasets/|spaces/]org/name`, so
`org/*` allows the org's models and `datasets/org/*` its datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .layout import RepoSpec
from .upstream.sourcespec import parse_sources


def spec_key(spec: str) -> tuple[str, str]:
    """`[datasets/]org/name[@rev][=mode]` -> (repo_type, repo_id)."""
    return RepoSpec.parse(spec.partition("=")[0]).repo


@dataclass(frozen=True)
class RepoPolicy:
    named: frozenset[tuple[str, str]]  # repos the operator listed by name
    globs: tuple[str, ...] = ()  # patterns of repos a request may make the node resolve

    @classmethod
    def from_config(cls, cfg) -> RepoPolicy:
        specs = (*cfg.repos, *cfg.preload, *(e.partition("=")[0].strip() for e in cfg.repo_tokens))
        named = {spec_key(s) for s in specs} | set(parse_sources(cfg.sources))
        # A glob without a wildcard names one repo exactly: it may be private.
        named |= {spec_key(g) for g in cfg.on_demand if not any(c in g for c in "*?[")}
        return cls(frozenset(named), tuple(cfg.on_demand))

    def names(self, repo_type: str, repo_id: str) -> bool:
        """Named by the operator (not only matched by a wildcard): private repos need this."""
        return (repo_type, repo_id) in self.named

    def allows(self, repo_type: str, repo_id: str) -> bool:
        if self.names(repo_type, repo_id):
            return True
        name = RepoSpec(repo_type, repo_id).name
        return any(fnmatchcase(name, g) for g in self.globs)
