"""The syntax of source settings (pure: no I/O): `sources`, `repo_tokens`, s3 URLs.

Config `sources` entries are `REPO=SRC[,SRC...]`, e.g.
`org/name=hf,s3://bucket/prefix` or `local/llama=s3://models/llama`, where
SRC is `hf`, `s3://bucket[/prefix]`, `http(s)://base/url` (a manifest at
`<base>/.nodecache-manifest.json`) or `file:///dir` / `/dir`. config.py checks
them when it loads; upstream/sources.py builds the upstreams they name.

An http source's `user:password@` is sent as Basic auth and shown nowhere:
every message names a source URL by `shown_url`, and an exception text that
may quote one goes through `hide_userinfo` first.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..layout import InvalidName, RepoSpec

_BUCKET_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9][a-z0-9.-]*[a-z0-9]$")
# The userinfo of a URL quoted in a text: after `//`, up to the last `@` before the path, query,
# fragment or a space (a URL's userinfo has none of these unencoded).
_USERINFO_RE = re.compile(r"(?<=//)[^/?#\s]*@")


def shown_url(url: str) -> str:
    """`url` as a message may show it: its userinfo (`user:password@`, `user@`) as `***@`.

    The authority is read as urlsplit reads it (up to the first `/`, `?` or `#`,
    the userinfo up to its last `@`), so what is hidden is what would be sent.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, end)
    return url if at < 0 else f"{scheme}://***@{rest[at + 1 :]}"


def hide_userinfo(text: str) -> str:
    """`text` (an exception's, say) with the userinfo of every URL it quotes shown as `***@`."""
    return _USERINFO_RE.sub("***@", text)


@dataclass(frozen=True)
class SourceSpec:
    scheme: str  # "hf" | "s3" | "http" | "local"
    url: str  # normalised: "hf", "s3://bucket/prefix", "https://host/base", "/abs/dir"


def parse_source(raw: str) -> SourceSpec:
    """One SRC of a `sources` entry; ValueError says what is wrong (never with a password)."""
    raw = raw.strip()
    if raw == "hf":
        return SourceSpec("hf", "hf")
    if raw.startswith("/") or raw.startswith("file://"):
        path = raw[len("file://") :] if raw.startswith("file://") else raw
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"{quoted_url(raw)}: a local source needs an absolute path")
        return SourceSpec("local", os.path.normpath(path))
    parts = urlsplit(raw)
    if parts.scheme == "s3":
        bucket, prefix = parse_s3_url(raw)
        return SourceSpec("s3", f"s3://{bucket}/{prefix}".rstrip("/"))
    if parts.scheme in ("http", "https"):
        try:
            valid = parts.port != -1 and bool(parts.hostname)  # reading the port checks it (ValueError)
        except ValueError:
            valid = False
        if not valid:  # not quoted: without its `@`, a password reads as host or port
            raise ValueError(
                f"'{parts.scheme}://...': not a valid host[:port] (percent-encode a '/', '?', '#', ',' or '@'"
                " in the user name or password)"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"{quoted_url(raw)}: an http source is a base URL without query or fragment")
        return SourceSpec("http", raw.rstrip("/"))
    raise ValueError(
        f"{quoted_url(raw)}: unknown source scheme (use hf, s3://, http(s)://, file:// or an absolute path)"
    )


def quoted_url(raw: str) -> str:
    """How an error quotes a URL it rejects: as `shown_url` shows it, or by its scheme alone if
    an `@` is left (a password whose unencoded `/`, `?`, `#` or `,` ended the URL before its `@`)."""
    shown = shown_url(raw)
    if "@" not in shown.replace("://***@", "://", 1):
        return repr(shown)
    scheme, sep, _ = shown.partition("://")
    return f"'{scheme}://...'" if sep else "'...'"


def check_endpoint(url: str, credentials: str) -> None:
    """hub_url, s3_endpoint_url: an http(s)://host[:port][/path] without a user or password (the
    Hub takes a token, S3 the boto3 chain's credentials: `credentials` says so); ValueError says
    what is wrong, never quoting a password. Any `@` is refused: a password's `@` after an
    unencoded `/` reads as part of the path, which every error naming the URL would quote."""
    if "@" in url:
        raise ValueError(f"{quoted_url(url)}: a user or password in the URL is not supported ({credentials})")
    parts = urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != -1
    except ValueError:  # reading the port checks it
        valid = False
    if not valid:
        raise ValueError(f"{quoted_url(url)} is not an http(s) URL")


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix without slashes at the ends)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{quoted_url(url)}: not an s3://bucket/prefix URL")
    if not _BUCKET_RE.fullmatch(parts.netloc) or ".." in parts.netloc:
        raise ValueError(f"{quoted_url(url)}: {parts.netloc!r} is not a valid bucket name")
    prefix = parts.path.strip("/")
    if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
        raise ValueError(f"{quoted_url(url)}: bad prefix {prefix!r}")
    return parts.netloc, prefix


def parse_sources(entries: tuple[str, ...] | list[str]) -> dict[tuple[str, str], list[SourceSpec]]:
    """Config `sources` -> {(repo_type, repo_id): [SourceSpec, ...]}.

    A token without `=` continues the entry before it (so `org/a=hf,s3://b/p`
    survives being split at the comma, as NODECACHE_SOURCES is); so does one whose
    `=` follows a `://` or a leading `/` (a source, such as a URL whose password has one).
    One that reads as the end of a user name or password (an `@` before any `://`) after an
    http(s) source is refused: the comma was in the password, which must be percent-encoded.
    """
    groups: list[list[str]] = []
    for token in entries:
        for piece in token.split(","):
            piece = piece.strip()
            if not piece:
                continue
            scheme = _http_scheme(groups[-1]) if groups else None
            if scheme and _rest_of_userinfo(piece):
                raise ValueError(
                    f"'{scheme}://...': a ',' in a URL's user name or password ends the source there: percent-encode"
                    " it as %2C (and a '/', '?', '#' or '@' in it as %2F, %3F, %23, %40)"
                )
            head = piece.partition("=")[0]
            if "=" in piece and "://" not in head and not head.startswith("/"):
                groups.append(piece.split("=", 1))
            elif groups:
                groups[-1].append(piece)
            else:
                raise ValueError(f"{quoted_url(piece)}: an entry is REPO=SOURCE[,SOURCE...]")
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


def _http_scheme(group: list[str]) -> str | None:
    """The scheme of the last http(s) source of an entry read so far (`[REPO, SRC, ...]`), if any."""
    for src in reversed(group[1:]):
        scheme = src.partition("://")[0]
        if scheme.lower() in ("http", "https"):
            return scheme
    return None


def _rest_of_userinfo(piece: str) -> bool:
    """Whether a piece of a comma-split entry reads as the end of a URL's user name or password:
    an `@` before any `://`, and no path (a source, or the source of a REPO=SOURCE, never reads so)."""
    before, at, _ = piece.partition("@")
    if not at or "://" in before:
        return False
    source = before.partition("=")[2] if "=" in before else before
    return not source.startswith("/")


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
