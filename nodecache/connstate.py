"""The state of a FUSE connection that travels with its fd from one daemon to the next.

A connection is INIT-ed once; a daemon that takes it over must know what was
agreed then (protocol minor, flags such as passthrough and resend, limits) and
where and which mount it is. Inode numbers and open modes are not in here:
they change with every lookup and open and live in `inodes` (LMDB), which this
state names by `conn_id` so a table that is not this connection's is never
trusted. Pure: JSON in, JSON out.

Formats: each daemon writes `Config.state_format` (default `FORMAT`) and reads
every format whose `compat` it knows, so a newer daemon takes over from an
older one and an older one (up to `compat`) from a newer one.
  1: mount, dev, minor, flags.
  2: + conn_id, max_pages, max_background; compat 1 (a format-1 reader ignores the rest).
  3: as 2; compat 3: the kernel may hold inode numbers given as ranges (`inodes`), which a daemon
     reading up to 2 cannot resolve: it refuses the state and mounts a new connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

FORMAT = 3
FORMATS = (1, 2, 3)
MAX_BYTES = 16 * 1024  # a state is a few hundred bytes; anything bigger is not ours


class StateError(ValueError):
    """A state this daemon cannot use (unreadable, or from a newer, incompatible format)."""


@dataclass(frozen=True)
class ConnState:
    mount: str  # the mount point, as the daemon that mounted it resolved it
    dev: str  # major:minor of the FUSE mount (mountinfo): is the connection still mounted there?
    minor: int  # negotiated FUSE 7.x minor
    flags: int  # negotiated INIT flags (passthrough, resend, ...)
    conn_id: str | None = None  # the inode table written for this connection (None: format 1, unchecked)
    max_pages: int = 256
    max_background: int = 64
    format: int = FORMAT  # the format it was read from


def encode(state: ConnState, fmt: int = FORMAT) -> bytes:
    if fmt not in FORMATS:
        raise StateError(f"unknown state format {fmt}; this daemon writes {FORMATS}")
    out: dict = {"format": fmt, "mount": state.mount, "dev": state.dev, "minor": state.minor, "flags": state.flags}
    if fmt >= 2:
        compat = 3 if fmt >= 3 else 1
        out.update(compat=compat, conn_id=state.conn_id, max_pages=state.max_pages, max_background=state.max_background)
    return json.dumps(out, sort_keys=True).encode()


def decode(raw: bytes) -> ConnState:
    if len(raw) > MAX_BYTES:
        raise StateError(f"state of {len(raw)} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"state is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise StateError("state is not a JSON object")
    fmt = data.get("format")
    compat = data.get("compat", fmt)
    if not isinstance(fmt, int) or not isinstance(compat, int) or compat > max(FORMATS):
        raise StateError(f"state format {fmt!r} (compatible with {compat!r}); this daemon reads up to {max(FORMATS)}")
    try:
        state = ConnState(
            mount=_typed(data, "mount", str),
            dev=_typed(data, "dev", str),
            minor=_typed(data, "minor", int),
            flags=_typed(data, "flags", int),
            format=fmt,
        )
        if fmt >= 2:
            conn_id = data.get("conn_id")
            if conn_id is not None and not isinstance(conn_id, str):
                raise StateError("conn_id must be a string")
            state = replace(
                state,
                conn_id=conn_id,
                max_pages=_typed(data, "max_pages", int),
                max_background=_typed(data, "max_background", int),
            )
    except TypeError as e:
        raise StateError(str(e)) from None
    return state


def _typed(data: dict, key: str, kind: type):
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise StateError(f"state: {key} must be {kind.__name__}, got {value!r}")
    return value
