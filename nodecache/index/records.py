"""A blob's record as stored, and what its derived tables are made of (pure: no LMDB here)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]

from ..layout import COMMIT_RE, validate_blob_id, validate_relpath, validate_repo_id, validate_repo_type, validate_size

KINDS = ("sha256", "gitsha1", "source")  # "source": the id names a source version (upstream.manifest)
STATES = ("partial", "complete", "quarantined")
TIERS = ("disk", "shm")
BAD = (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError)  # what a hostile entry raises


@dataclass
class BlobRecord:
    """What we know of one content-addressed blob, and how to fill it."""

    blob_id: str
    size: int
    kind: str  # "sha256" | "gitsha1": which whole-blob hash proves the id
    chunk_size: int
    state: str = "partial"  # "partial" | "complete" | "quarantined"
    repo_type: str = "model"  # where to fetch it: any snapshot that lists it
    repo_id: str = ""
    commit: str = ""
    path: str = ""
    last_access: float = 0.0
    tier: str = "disk"  # which store tier holds its file
    failures: int = 0  # proofs failed in a row; reset by a proof that holds
    retry_at: float = 0.0  # quarantined: not fetched again before this (wall clock)
    demoted: list[str] = field(default_factory=list)  # sources that served the last failed attempt: asked last
    verified_at: float = 0.0  # complete: when its bytes on disk last proved its id (fill or scrub; wall clock)

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_size))


def check_blob(rec: BlobRecord) -> BlobRecord:
    """Raise ValueError unless every field is sane: records outlive versions, and their
    fields once came from outside (a size of 10^18 would size our memory at start)."""
    validate_blob_id(rec.blob_id)
    validate_size(rec.size)
    cs = rec.chunk_size
    if type(cs) is not int or not 64 * 1024 <= cs <= 1 << 30 or cs & (cs - 1):
        raise ValueError(f"chunk_size {cs!r}")
    if rec.kind not in KINDS or rec.state not in STATES or rec.tier not in TIERS:
        raise ValueError(f"kind/state/tier {rec.kind!r}/{rec.state!r}/{rec.tier!r}")
    for key in ("last_access", "retry_at", "verified_at"):
        if type(getattr(rec, key)) not in (int, float):
            raise ValueError(f"{key} {getattr(rec, key)!r}")
    if type(rec.failures) is not int or not 0 <= rec.failures <= 1 << 20:
        raise ValueError(f"failures {rec.failures!r}")
    if not isinstance(rec.demoted, list) or len(rec.demoted) > 64:
        raise ValueError("demoted: not a short list")
    if not all(isinstance(name, str) and len(name) <= 300 for name in rec.demoted):
        raise ValueError("demoted: not source names")
    validate_repo_type(rec.repo_type)
    if rec.repo_id or rec.commit or rec.path:  # where to fetch it: all three, or none
        validate_repo_id(rec.repo_id)
        validate_relpath(rec.path)
        if not COMMIT_RE.fullmatch(rec.commit):
            raise ValueError(f"commit {rec.commit!r}")
    return rec


def encode(rec: BlobRecord) -> bytes:
    """A record as stored: its fields, in order (`dataclasses.asdict` deep-copies each one:
    it was half the time of registering a 10^5-file snapshot)."""
    return json.dumps(vars(rec)).encode()


def encoder_for(template: BlobRecord) -> Callable[[str, int, str, str], bytes]:
    """`encode` of records equal to `template` but for (blob_id, size, kind, path), byte for byte:
    a new snapshot's records share every other field, so each is one %-format of its own four,
    not a json.dumps of fifteen (that was a third of registering 10^5 files). The size must be
    an int (not a bool), as `check_blob` has it."""
    marks = {"blob_id": "\ue000", "size": "\ue001", "kind": "\ue002", "path": "\ue003"}
    text = json.dumps({**vars(template), **marks}).replace("%", "%%")
    for name, mark in marks.items():
        quoted = json.dumps(mark)
        if text.count(quoted) != 1:  # a mark inside another field: never in a checked template
            raise ValueError(f"cannot make an encoder for a record holding {quoted}")
        text = text.replace(quoted, "%d" if name == "size" else "%s")
    fmt = text.encode()
    quote = encode_basestring_ascii  # what json.dumps writes for a str (ensure_ascii)

    def encode_one(blob_id: str, size: int, kind: str, path: str) -> bytes:
        return fmt % (quote(blob_id).encode(), size, quote(kind).encode(), quote(path).encode())

    return encode_one


def decode(key: bytes, raw: bytes) -> BlobRecord:
    """A stored record, checked (raises one of BAD)."""
    rec = check_blob(BlobRecord(**json.loads(raw)))
    if rec.blob_id.encode() != key:
        raise ValueError(f"record of {rec.blob_id} stored under another id")
    return rec


Derived = tuple[str, float, float, int, str]  # (state, verified_at, last_access, size, tier)


def derived(rec: BlobRecord) -> Derived:
    """What the derived tables are made of."""
    return (rec.state, float(rec.verified_at), float(rec.last_access), rec.size, rec.tier)


def derived_of(raw: bytes | None) -> Derived | None:
    """What a stored record was derived from (None: absent, or unusable): read without
    the record's full check, so that a hostile entry is still taken out of what it counted."""
    try:
        d = json.loads(raw) if raw else None
        if d is None:
            return None
        state, at, used = d["state"], d.get("verified_at", 0.0), d.get("last_access", 0.0)
        size, tier = d.get("size", 0), d.get("tier", "disk")
    except BAD:
        return None
    if state not in STATES or type(at) not in (int, float) or type(used) not in (int, float):
        return None
    size = size if type(size) is int and size >= 0 else 0  # never written so: a hostile entry
    return (state, float(at), float(used), size, tier if tier in TIERS else "disk")


_LAST_ACCESS = re.compile(rb'"last_access": (-?[0-9][0-9.eE+-]*)')


def last_access_of(raw: bytes | None) -> float:
    """A stored record's last_access, found without decoding the record (registering a
    10^5-file snapshot reads one per file: decoding them doubled its time); 0.0 if absent or
    unusable. `encode` writes the key so, and a quote inside a string value is escaped."""
    found = _LAST_ACCESS.search(raw) if raw else None
    try:
        at = float(found.group(1)) if found else 0.0
    except ValueError:
        return 0.0
    return at if math.isfinite(at) and at > 0 else 0.0
