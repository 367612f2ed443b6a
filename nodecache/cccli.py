"""`nodecache ls --compile-caches`, `evict --compile-cache KEY`, `compile-cache seal KEY`: thin over /v1."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

Call = Callable[[str, str, dict | None], dict]


def ls(call: Call, as_json: bool) -> int:
    out = call("GET", "/v1/compile-caches", None)
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    rows = [("KEY", "FILES", "SIZE", "IN USE", "SEALED", "DIRTY", "LAST USED")]
    for k in out["compile_caches"]:
        sealed = k["sealed"]
        age = f"{(time.time() - sealed['at']) / 60:.0f}m ago" if sealed else "-"
        last = f"{(time.time() - k['last_used']) / 60:.0f}m ago"
        rows.append(
            (k["key"], str(k["files"]), f"{k['bytes'] / 1e6:,.1f} MB", str(k["in_use"]), age, str(k["dirty"]), last)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    quota = f" of {out['max_bytes'] / 1e6:,.1f} MB" if out["max_bytes"] else ""
    print(f"total {out['used_bytes'] / 1e6:,.1f} MB{quota}")
    return 0


def evict(call: Call, key: str) -> int:
    out = call("POST", "/v1/compile-caches/evict", {"key": key})
    print(f"evicted compile cache {out['evicted']!r}, {out['freed_bytes']:,} bytes")
    return 0


def seal(call: Call, key: str) -> int:
    out = call("POST", "/v1/compile-caches/seal", {"key": key})
    print(f"sealed {out['key']!r}: {out['files']} files, {out['bytes']:,} bytes, snapshot {out['id'][:12]}")
    return 0
