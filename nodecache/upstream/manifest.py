"""Pure helpers shared by the non-HF upstreams (s3, http, local): no I/O here.

A non-HF source is a flat listing of objects (relative key, size, a version
token such as an S3 ETag). From that listing, plus the few small files it
names, `build_snapshot` recognises what the source holds and turns it into a
snapshot in the HF layout:

1. `.nodecache-manifest.json` — `{"commit"?: 40-hex, "files": [{path, size,
   sha256 | (blob_id, kind)}]}`: ids are content hashes, verified whole-blob.
2. an HF cache copy (`refs/<rev>`, `snapshots/<commit>/...`, `blobs/<id>`):
   served as that repo with its real commit and ids; bytes come from `blobs/`.
3. an `hf download --local-dir` copy (`.cache/huggingface/download/<path>.metadata`:
   commit, etag, timestamp): the real commit and ids; bytes from `<path>`.
4. anything else (a plain prefix/directory): ids are the sha256 of the content
   when the source states it (S3 `x-amz-checksum-sha256`), else a stable
   *source-identified* id: sha256 over (source, key, version, size), kind
   "source". Such an id proves nothing about the bytes, so there is no
   whole-blob hash to check: every chunk is instead fetched pinned to the
   version seen at resolve time (S3 If-Match, file mtime/size) and its xxh3 is
   re-checked on disk before the blob is marked complete (`Store.finish`).

The synthesized commit is the first 40 hex of sha256 over the sorted manifest
(path, size, id), so it changes exactly when the content (or its version) does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..layout import BLOB_ID_RE, COMMIT_RE, FileEntry, InvalidName, validate_blob_id, validate_relpath
from . import RemoteFile, Resolved, UpstreamError
from .sourcespec import shown_url

MANIFEST = ".nodecache-manifest.json"
LOCAL_DIR_META = ".cache/huggingface/download/"
SOURCE_KIND = "source"  # blob id names a source version, not the content
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class BadManifest(UpstreamError):
    """The source's manifest or HF-layout metadata is malformed: not retried."""


@dataclass(frozen=True)
class SourceObject:
    """One object of a listing: `key` relative to the source root."""

    key: str
    size: int
    version: str = ""  # ETag / VersionId / mtime: changes when the content does
    sha256: str | None = None  # hex, when the source states the content hash


@dataclass(frozen=True)
class SourceFile:
    """Where the bytes of one snapshot file live in the source."""

    path: str  # path in the repo
    key: str  # relative key in the source
    size: int
    blob_id: str
    kind: str  # "sha256" | "gitsha1" | "source"
    version: str = ""


@dataclass(frozen=True)
class Snapshot:
    commit: str
    files: list[SourceFile]
    layout: str  # "manifest" | "hf-cache" | "local-dir" | "plain"

    def resolved(self) -> Resolved:
        return Resolved(self.commit, [RemoteFile(FileEntry(f.path, f.size, f.blob_id), f.kind) for f in self.files])


def checksum_sha256(b64: str | None) -> str | None:
    """S3's `x-amz-checksum-sha256` (base64 of the full-object digest) -> hex; None if composite."""
    if not b64 or "-" in b64:
        return None
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def source_blob_id(source: str, key: str, version: str, size: int) -> str:
    """A stable id for content known only by where it lives and which version it is."""
    return hashlib.sha256(f"nodecache-source\0{source}\0{key}\0{version}\0{size}".encode()).hexdigest()


def synth_commit(files: list[SourceFile]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.size}\0{f.blob_id}\n".encode())
    return h.hexdigest()[:40]


def _kind_of(blob_id: str) -> str:
    return "sha256" if len(blob_id) == 64 else "gitsha1"


def _hidden(key: str) -> bool:
    return (
        key == MANIFEST or key.startswith(".cache/huggingface/") or key.startswith(".git/") or key == ".gitattributes~"
    )


Reader = Callable[[str], Awaitable[bytes]]


async def build_snapshot(objects: list[SourceObject], read: Reader, source: str, revision: str = "main") -> Snapshot:
    """Recognise the source's layout and return its snapshot (see the module doc). `source` goes
    into source-identified ids as given; messages name it by `shown_url` (no user or password)."""
    name = shown_url(source)
    by_key = {o.key: o for o in objects}
    if not by_key:
        raise BadManifest(f"{name}: no objects (empty or missing prefix/directory)")
    if MANIFEST in by_key:
        return _from_manifest(await read(MANIFEST), by_key, name)
    if any(k.startswith("refs/") for k in by_key) and any(k.startswith("snapshots/") for k in by_key):
        return await _from_hf_cache(by_key, read, source, name, revision)
    if any(k.startswith(LOCAL_DIR_META) and k.endswith(".metadata") for k in by_key):
        return await _from_local_dir(by_key, read, source, name)
    return _plain(by_key, source, name)


def parse_manifest(raw: bytes, source: str) -> tuple[str | None, list[SourceFile]]:
    """A manifest document: a JSON list of files, or {"commit", "files"}; messages name `source` by `shown_url`."""
    source = shown_url(source)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # "[[[[…" raises RecursionError
        raise BadManifest(f"{source}: manifest is not JSON: {e}") from None
    commit = None
    if isinstance(doc, dict):
        commit, doc = doc.get("commit"), doc.get("files")
        if commit is not None and not (isinstance(commit, str) and COMMIT_RE.fullmatch(commit)):
            raise BadManifest(f"{source}: manifest commit {commit!r} is not 40 hex")
    if not isinstance(doc, list):
        raise BadManifest(f"{source}: manifest needs a list of files")
    files = []
    for i, item in enumerate(doc):
        try:
            path = validate_relpath(str(item["path"]))
            size = int(item["size"])
            if size < 0:
                raise ValueError("negative size")
            if item.get("sha256"):
                blob_id, kind = validate_blob_id(str(item["sha256"]).lower()), "sha256"
                if len(blob_id) != 64:
                    raise ValueError("sha256 must be 64 hex")
            else:
                blob_id = validate_blob_id(str(item["blob_id"]).lower())
                kind = str(item.get("kind") or _kind_of(blob_id))
                if kind not in ("sha256", "gitsha1"):
                    raise ValueError(f"kind {kind!r}")
        except (KeyError, TypeError, ValueError, InvalidName) as e:
            raise BadManifest(f"{source}: manifest entry {i}: {e.__class__.__name__}: {e}") from None
        files.append(SourceFile(path, path, size, blob_id, kind))
    if len({f.path for f in files}) != len(files):
        raise BadManifest(f"{source}: manifest lists a path twice")
    return commit, files


def _from_manifest(raw: bytes, by_key: dict[str, SourceObject], name: str) -> Snapshot:
    commit, files = parse_manifest(raw, name)
    for f in files:
        o = by_key.get(f.key)
        if o is None:
            raise BadManifest(f"{name}: manifest lists {f.path!r}, which the source does not hold")
        if o.size != f.size:
            raise BadManifest(f"{name}: {f.path!r} is {o.size} bytes, manifest says {f.size}")
    files = [SourceFile(f.path, f.key, f.size, f.blob_id, f.kind, by_key[f.key].version) for f in files]
    return Snapshot(commit or synth_commit(files), files, "manifest")


async def _from_hf_cache(
    by_key: dict[str, SourceObject], read: Reader, source: str, name: str, revision: str
) -> Snapshot:
    if COMMIT_RE.fullmatch(revision):
        commit = revision
    else:
        ref = by_key.get("refs/" + revision)
        if ref is None:
            raise BadManifest(f"{name}: HF cache copy has no refs/{revision}")
        commit = (await read(ref.key)).decode(errors="replace").strip()
        if not COMMIT_RE.fullmatch(commit):
            raise BadManifest(f"{name}: refs/{revision} does not hold a commit")
    base = f"snapshots/{commit}/"
    blobs: dict[int, list[str]] = {}
    for k, o in by_key.items():
        name = k[len("blobs/") :]
        if k.startswith("blobs/") and BLOB_ID_RE.fullmatch(name):
            blobs.setdefault(o.size, []).append(name)
    files = []
    for k, o in sorted(by_key.items()):
        if not k.startswith(base):
            continue
        path = validate_relpath(k[len(base) :])
        if o.sha256 and o.sha256 in blobs.get(o.size, ()):  # stated content hash
            blob_id = o.sha256
        elif len(blobs.get(o.size, ())) == 1:  # a synced copy dereferences symlinks: match by size
            blob_id = blobs[o.size][0]
        else:
            blob_id = ""
        if blob_id:
            files.append(SourceFile(path, "blobs/" + blob_id, o.size, blob_id, _kind_of(blob_id), o.version))
        else:
            files.append(_identified(path, o, source))
    if not files:
        raise BadManifest(f"{name}: HF cache copy has no files under {base}")
    return Snapshot(commit, files, "hf-cache")


async def _from_local_dir(by_key: dict[str, SourceObject], read: Reader, source: str, name: str) -> Snapshot:
    files, commits = [], set()
    for k, o in sorted(by_key.items()):
        if _hidden(k):
            continue
        path = validate_relpath(k)
        meta = by_key.get(LOCAL_DIR_META + k + ".metadata")
        lines = (await read(meta.key)).decode(errors="replace").splitlines() if meta else []
        etag = lines[1].strip().strip('"').lower() if len(lines) >= 2 else ""
        if BLOB_ID_RE.fullmatch(etag) and COMMIT_RE.fullmatch(lines[0].strip()):
            commits.add(lines[0].strip())
            files.append(SourceFile(path, k, o.size, etag, _kind_of(etag), o.version))
        else:
            commits.add("")
            files.append(_identified(path, o, source))
    if not files:
        raise BadManifest(f"{name}: local-dir copy holds no files")
    commit = commits.pop() if len(commits) == 1 and "" not in commits else synth_commit(files)
    return Snapshot(commit, files, "local-dir")


def _identified(path: str, o: SourceObject, source: str) -> SourceFile:
    if o.sha256 and _SHA256_RE.fullmatch(o.sha256):
        return SourceFile(path, o.key, o.size, o.sha256, "sha256", o.version)
    return SourceFile(path, o.key, o.size, source_blob_id(source, o.key, o.version, o.size), SOURCE_KIND, o.version)


def _plain(by_key: dict[str, SourceObject], source: str, name: str) -> Snapshot:
    files = [_identified(validate_relpath(k), o, source) for k, o in sorted(by_key.items()) if not _hidden(k)]
    if not files:
        raise BadManifest(f"{name}: holds no files")
    return Snapshot(synth_commit(files), files, "plain")
