"""The syntax of source settings (pure: no I/O): `sources`, `repo_tokens`, s3 URLs.

Config `sources` entries are `REPO=SRC[,SRC...]`, e.g.
`org/name=hf,s3://bucket/prefix` or `local/llama=s3://models/llama`, where
SRC is `hf`, `s3://bucket[/prefix]`, `http(s)://base/url` (a manifest at
`<base>/.nodecache-manifest.json`) or `file:///dir` / `/dir`. config.py checks
them when it loads; upstream/sources.py builds the upstreams they name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..layout import InvalidName, RepoSpec

_BUCKET_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9][a-z0-9.-]*[a-z0-9]$")


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


def parse_repo_token_files(entries) -> dict[tuple[str, str], str]:
    """Config `repo_tokens`: `org/name=/path/to/token-file` -> {(type, id): path}; ValueError says what is wrong."""
    out: dict[tuple[str, str], str] = {}
    for entry in entries:
        repo, sep, path = entry.partition("=")
        try:
            key = RepoSpec.parse(repo.strip()).repo
        except InvalidName as e:
            raise ValueError(str(e)) from None
        if not sep or not path.startswith("/"):
            raise ValueError(f"{entry!r} is not REPO=/absolute/token/file")
        out[key] = path
    return out
