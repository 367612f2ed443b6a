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

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..expiring import Window
from ..index import BlobRecord
from ..layout import COMMIT_RE, InvalidName, RepoSpec
from . import NotFound, Resolved, Upstream, UpstreamError
from .manifest import SOURCE_KIND, Snapshot, SourceFile, SourceObject, build_snapshot

log = logging.getLogger(__name__)

_BUCKET_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9][a-z0-9.-]*[a-z0-9]$")
_RESCAN_EVERY = 30.0  # a source that does not know a blob lists itself again at most this often


@dataclass(frozen=True)
class SourceSpec:
    scheme: str  # "hf" | "s3" | "http" | "local"
    url: str  # normalised: "hf", "s3://bucket/prefix", "https://host/base", "/abs/dir"


def parse_source(raw: str) -> SourceSpec:
    """One SRC of a `sources` entry; ValueError says what is wrong."""
    raw = raw.strip()
    if raw == "hf":
        return SourceSpec("hf", "hf")
    if raw.startswith("/") or raw.startswith("file://"):
        path = raw[len("file://") :] if raw.startswith("file://") else raw
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"{raw!r}: a local source needs an absolute path")
        return SourceSpec("local", os.path.normpath(path))
    parts = urlsplit(raw)
    if parts.scheme == "s3":
        bucket, prefix = parse_s3_url(raw)
        return SourceSpec("s3", f"s3://{bucket}/{prefix}".rstrip("/"))
    if parts.scheme in ("http", "https"):
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{raw!r}: an http source is a base URL without query or fragment")
        return SourceSpec("http", raw.rstrip("/"))
    raise ValueError(f"{raw!r}: unknown source scheme (use hf, s3://, http(s)://, file:// or an absolute path)")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix without slashes at the ends)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{url!r}: not an s3://bucket/prefix URL")
    if not _BUCKET_RE.fullmatch(parts.netloc) or ".." in parts.netloc:
        raise ValueError(f"{url!r}: {parts.netloc!r} is not a valid bucket name")
    prefix = parts.path.strip("/")
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
        raise ValueError(f"{url!r}: bad prefix {prefix!r}")
    return parts.netloc, prefix


def parse_sources(entries: tuple[str, ...] | list[str]) -> dict[tuple[str, str], list[SourceSpec]]:
    """Config `sources` -> {(repo_type, repo_id): [SourceSpec, ...]}.

    A token without `=` continues the entry before it (so `org/a=hf,s3://b/p`
    survives being split at the comma, as NODECACHE_SOURCES is).
    """
    groups: list[list[str]] = []
    for token in entries:
        for piece in token.split(","):
            piece = piece.strip()
            if not piece:
                continue
            if "=" in piece:
                groups.append(piece.split("=", 1))
            elif groups:
                groups[-1].append(piece)
            else:
                raise ValueError(f"{piece!r}: an entry is REPO=SOURCE[,SOURCE...]")
    out: dict[tuple[str, str], list[SourceSpec]] = {}
    for repo, *srcs in groups:
        try:
            spec = RepoSpec.parse(repo.strip())
        except InvalidName as e:
            raise ValueError(f"{repo!r}: {e}") from None
        if spec.revision is not None:
            raise ValueError(f"{repo!r}: sources belong to a repo, not a revision")
        specs = [parse_source(s) for s in srcs if s.strip()]
        if not specs:
            raise ValueError(f"{repo!r}: no sources")
        if spec.repo in out:
            raise ValueError(f"{repo!r}: listed twice")
        out[spec.repo] = specs
    return out


# --- sources that are a listing of objects (s3, http, local) --------------------------


class ListingUpstream:
    """A source that lists objects under a root and reads byte ranges of one.

    Subclasses implement `_list`, `_read_small` and `_read_range`. The last
    snapshot built is remembered by blob id (and path), so chunk fetches know
    each blob's key and version; a blob this source has not seen (a repo
    resolved from the Hub, falling back here) triggers one fresh listing.
    """

    name = "source"
    kind = "upstream"

    def __init__(self, url: str):
        self.url = url
        self._by_id: dict[str, SourceFile] = {}
        self._by_path: dict[str, SourceFile] = {}
        self._scan_lock = asyncio.Lock()
        self._scanned = Window(_RESCAN_EVERY)  # open for a while after each listing

    def __repr__(self) -> str:
        return f"<{self.__class__.__name__} {self.url}>"

    async def _list(self) -> list[SourceObject]:
        raise NotImplementedError

    async def _read_small(self, key: str) -> bytes:
        raise NotImplementedError

    async def _read_range(self, f: SourceFile, start: int, end: int) -> bytes | bytearray:
        raise NotImplementedError

    async def snapshot(self, revision: str = "main") -> Snapshot:
        snap = await build_snapshot(await self._list(), self._read_small, self.url, revision)
        self._scanned.open()
        for f in snap.files:
            self._by_id[f.blob_id] = f
            self._by_path[f.path] = f
        return snap

    async def resolve(self, repo_type: str, repo_id: str, revision: str) -> Resolved:
        snap = await self.snapshot(revision)
        if COMMIT_RE.fullmatch(revision) and snap.commit != revision:
            raise NotFound(f"{self.url}: holds {snap.commit[:12]}, not revision {revision[:12]} of {repo_id}")
        log.info("%s: %s layout, %d files, commit %s", self.url, snap.layout, len(snap.files), snap.commit[:12])
        return snap.resolved()

    async def _locate(self, rec: BlobRecord) -> SourceFile:
        f = self._by_id.get(rec.blob_id)
        if f is None:
            async with self._scan_lock:
                f = self._by_id.get(rec.blob_id)
                if f is None and not self._scanned:
                    self._scanned.open()
                    await self.snapshot()
                    f = self._by_id.get(rec.blob_id)
        if f is None:  # the same content under the same path, stated by another source's id
            same = self._by_path.get(rec.path)
            if same is not None and same.size == rec.size and rec.kind != SOURCE_KIND:
                f = same
        if f is None:
            raise NotFound(f"{self.url}: does not hold {rec.path!r} (blob {rec.blob_id[:12]})")
        return f

    async def fetch(self, rec: BlobRecord, start: int, end: int) -> bytes | bytearray:
        f = await self._locate(rec)
        data = await self._read_range(f, start, end)
        if len(data) != end - start:
            raise UpstreamError(f"{self.url}/{f.key}: got {len(data)} bytes of [{start}-{end})")
        return data

    async def close(self) -> None:
        pass


# --- the chain -------------------------------------------------------------------------


class Sources:
    """Every configured upstream, and which of them serve which repo, in order.

    Usable wherever an `Upstream` is: `resolve` tries the repo's sources in
    order; `chain(rec, k)` is the fill path's per-chunk source list.
    """

    name = "sources"
    kind = "upstream"

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

    async def fetch(self, rec: BlobRecord, start: int, end: int) -> bytes | bytearray:
        errors: list[UpstreamError] = []
        for src in self.chain(rec):
            try:
                return await src.fetch(rec, start, end)
            except UpstreamError as e:
                errors.append(e)
        if errors and all(isinstance(e, NotFound) for e in errors):
            raise errors[-1]
        raise errors[-1] if errors else UpstreamError(f"no source for {rec.repo_id}")

    async def close(self) -> None:
        seen: set[int] = set()
        for chain in self.chains.values():
            for src in chain:
                if id(src) not in seen and hasattr(src, "close") and src is not self.hf:
                    seen.add(id(src))
                    await src.close()


def build_sources(cfg, session, metrics, hf: Upstream) -> Sources:
    """The daemon's Sources from config: one upstream object per distinct URL."""
    from .http import HttpUpstream
    from .local import LocalUpstream
    from .s3 import S3Upstream

    made: dict[str, Upstream] = {"hf": hf}
    chains: dict[tuple[str, str], list[Upstream]] = {}
    from ..config import ConfigError

    try:
        tokens = parse_repo_tokens(cfg.repo_tokens)
    except ValueError as e:
        raise ConfigError(f"repo_tokens: {e}") from None
    specs_by_repo = parse_sources(cfg.sources)
    for repo in tokens:
        specs_by_repo.setdefault(repo, [SourceSpec("hf", "hf")])
    for repo, specs in specs_by_repo.items():
        chain = []
        for spec in specs:
            if spec.scheme == "hf" and repo in tokens:  # a per-repo token: its own Hub client
                from .hf import HfUpstream

                chain.append(HfUpstream(cfg.hub_url, session, metrics, token=tokens[repo]))
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
                        auth = _read_secret(cfg.http_auth_file) if cfg.http_auth_file else None
                    except ValueError as e:
                        raise ConfigError(f"http_auth_file: {e}") from None
                    up = HttpUpstream(spec.url, session, metrics, auth_header=auth)
                else:
                    up = LocalUpstream(spec.url, metrics)
                made[spec.url] = up
            chain.append(up)
        chains[repo] = chain
    return Sources(hf, chains)


def parse_repo_tokens(entries) -> dict[tuple[str, str], str]:
    """Config `repo_tokens`: `org/name=/path/to/token-file` -> {(type, id): token}.

    ValueError names the repo and the file, never the token.
    """
    out: dict[tuple[str, str], str] = {}
    for entry in entries:
        repo, sep, path = entry.partition("=")
        if not sep or not path.startswith("/"):
            raise ValueError(f"{entry!r}: an entry is REPO=/absolute/token/file")
        try:
            repo_type, repo_id = RepoSpec.parse(repo.strip()).repo
        except InvalidName as e:
            raise ValueError(f"{repo!r}: {e}") from None
        token = _read_secret(path)
        if not token:
            raise ValueError(f"{repo!r}: token file {path} is empty")
        out[(repo_type, repo_id)] = token
    return out


def _read_secret(path) -> str:
    try:
        return open(path).read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None


# --- verification of source-identified blobs ---------------------------------------------


# --- config ----------------------------------------------------------------------------


def check_config(cfg) -> None:
    """Syntax of the source settings, at config time (no I/O); ConfigError names the key."""
    from ..config import ConfigError

    try:
        parse_sources(cfg.sources)
    except ValueError as e:
        raise ConfigError(f"sources: {e}") from None
    for entry in cfg.repo_tokens:
        repo, sep, path = entry.partition("=")
        try:
            RepoSpec.parse(repo.strip())
        except InvalidName as e:
            raise ConfigError(f"repo_tokens: {e}") from None
        if not sep or not path.startswith("/"):
            raise ConfigError(f"repo_tokens: {entry!r} is not REPO=/absolute/token/file")
    url = cfg.s3_endpoint_url
    if url is not None and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
        raise ConfigError(f"s3_endpoint_url: {url!r} is not an http(s) URL")


def yaml_repos(items: list) -> tuple[tuple[str, ...], list[str]]:
    """YAML `repos` items: a spec string or `{id, revision?, sources?: [..]}` -> (specs, sources entries)."""
    from ..config import ConfigError

    specs, sources = [], []
    for item in items:
        if isinstance(item, str):
            specs.append(item)
            continue
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ConfigError(f"repos: {item!r} needs an 'id'")
        unknown = set(item) - {"id", "revision", "sources"}
        if unknown:
            raise ConfigError(f"repos: unknown key(s) {sorted(unknown)} in {item['id']!r}")
        specs.append(item["id"] + (f"@{item['revision']}" if item.get("revision") else ""))
        srcs = item.get("sources")
        if srcs:
            if isinstance(srcs, str):
                srcs = [srcs]
            sources.append(f"{item['id']}=" + ",".join(str(s) for s in srcs))
    return tuple(specs), sources
