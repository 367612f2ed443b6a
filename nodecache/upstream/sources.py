"""Per-repo source chains: which upstreams a repo's metadata and chunks come from.

Config `sources` entries are `REPO=SRC[,SRC...]`, e.g.
`org/name=hf,s3://bucket/prefix` or `local/llama=s3://models/llama`, where
SRC is `hf`, `s3://bucket[/prefix]`, `http(s)://base/url` (a manifest at
`<base>/.nodecache-manifest.json`) or `file:///dir` / `/dir`. Repos without an
entry use the Hub. A repo's sources are tried in order, for its metadata at
resolve time and for every chunk (the fill path verifies whatever serves it),
so a Hub outage falls back to the bucket mid-file.
"""

from __future__ import annotations

import logging

from ..config import Config, ConfigError
from ..index import BlobRecord
from ..layout import RepoSpec
from ..metrics import Metrics
from ..tokenfile import read_secret
from . import NotFound, Resolved, Upstream, UpstreamError
from .hf import HfUpstream
from .http import HttpUpstream
from .local import LocalUpstream
from .s3 import S3Upstream
from .sourcespec import SourceSpec, parse_repo_token_files, parse_sources

log = logging.getLogger(__name__)


# --- the chain -------------------------------------------------------------------------


class Sources:
    """Every configured upstream, and which of them serve which repo, in order.

    A `Resolver`: `resolve` tries the repo's sources in order; `chain(rec, k)` is
    the fill path's per-chunk source list.
    """

    def __init__(self, hf: Upstream, chains: dict[tuple[str, str], list[Upstream]]):
        self.hf = hf
        self.chains = chains

    def for_repo(self, repo_type: str, repo_id: str) -> list[Upstream]:
        return self.chains.get((repo_type, repo_id)) or [self.hf]

    def chain(self, rec: BlobRecord, k: int = 0) -> list[Upstream]:
        return self.for_repo(rec.repo_type, rec.repo_id)

    def specs(self, configured: tuple[str, ...] = ()) -> list[str]:
        """Repos named in `sources` but not in `repos`: resolved at start too."""
        have = {RepoSpec.parse(s.partition("=")[0]).repo for s in configured}
        return [RepoSpec(t, repo_id).name for t, repo_id in self.chains if (t, repo_id) not in have]

    async def resolve(self, repo_type: str, repo_id: str, revision: str) -> Resolved:
        chain = self.for_repo(repo_type, repo_id)
        if len(chain) == 1:  # nothing to fall back to: the source's own error, unchanged
            return await chain[0].resolve(repo_type, repo_id, revision)
        errors: list[UpstreamError] = []
        for i, src in enumerate(chain):
            try:
                return await src.resolve(repo_type, repo_id, revision)
            except UpstreamError as e:
                errors.append(e)
                if i + 1 < len(chain):
                    log.warning(
                        "resolving %s@%s from %s failed (trying the next source): %s", repo_id, revision, src.name, e
                    )
        if all(isinstance(e, NotFound) for e in errors):
            raise NotFound("; ".join(str(e) for e in errors))
        raise UpstreamError("; ".join(str(e) for e in errors))

    async def close(self) -> None:
        seen: set[int] = set()
        for chain in self.chains.values():
            for src in chain:
                if id(src) not in seen and src is not self.hf:
                    seen.add(id(src))
                    await src.close()


def build_sources(cfg: Config, session, metrics: Metrics, hf: HfUpstream) -> Sources:
    """The daemon's Sources from config: one upstream object per distinct URL (the Hub's
    clients share `hf`'s receiver)."""
    made: dict[str, Upstream] = {"hf": hf}
    chains: dict[tuple[str, str], list[Upstream]] = {}
    try:
        tokens = read_repo_tokens(cfg.repo_tokens)
    except ValueError as e:
        raise ConfigError(f"repo_tokens: {e}") from None
    specs_by_repo = parse_sources(cfg.sources)
    for repo in tokens:
        specs_by_repo.setdefault(repo, [SourceSpec("hf", "hf")])
    for repo, specs in specs_by_repo.items():
        chain = []
        for spec in specs:
            if spec.scheme == "hf" and repo in tokens:  # a per-repo token: its own Hub client
                chain.append(HfUpstream(cfg.hub_url, session, metrics, token=tokens[repo], receiver=hf.receiver))
                continue
            up = made.get(spec.url)
            if up is None:
                if spec.scheme == "s3":
                    up = S3Upstream(
                        spec.url,
                        metrics,
                        endpoint_url=cfg.s3_endpoint_url,
                        region=cfg.s3_region,
                        path_style=cfg.s3_path_style,
                        max_workers=cfg.parallel_total + 4,
                    )
                elif spec.scheme == "http":
                    try:
                        auth = read_secret(cfg.http_auth_file) if cfg.http_auth_file else None
                    except ValueError as e:
                        raise ConfigError(f"http_auth_file: {e}") from None
                    up = HttpUpstream(spec.url, session, hf.receiver, metrics, auth_header=auth)
                else:
                    up = LocalUpstream(spec.url, metrics)
                made[spec.url] = up
            chain.append(up)
        chains[repo] = chain
    return Sources(hf, chains)


def read_repo_tokens(entries) -> dict[tuple[str, str], str]:
    """Config `repo_tokens` -> {(type, id): token}, the files read; ValueError names the repo and the
    file, never the token."""
    out: dict[tuple[str, str], str] = {}
    for repo, path in parse_repo_token_files(entries).items():
        token = read_secret(path)
        if not token:
            raise ValueError(f"{RepoSpec(*repo).name!r}: token file {path} is empty")
        out[repo] = token
    return out
