"""Blob files whose bytes did not prove their id: moved aside within bounds.

A quarantined file goes to its own tier's `quarantine/` (same filesystem: a
rename, also for shm) and stays counted in that tier's usage until cleaned;
a second failure of the same blob replaces the first file. Kept for
inspection within bounds (files, bytes, age); the oldest go first.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .layout import validate_blob_id
from .tier import Tier

log = logging.getLogger(__name__)


class Quarantined(Exception):
    """The blob's bytes did not hash to its id: moved aside, never served, fetched again later."""

    def __init__(self, blob_id: str, message: str):
        super().__init__(message)
        self.blob_id = blob_id


def quarantine_excess(
    entries: list[tuple[str, int, float]], now: float, max_files: int, max_bytes: int, ttl: float
) -> list[str]:
    """Names of quarantined files (name, bytes, mtime) to delete: all but the newest that
    fit in max_files and max_bytes and are younger than ttl."""
    keep_files = keep_bytes = 0
    drop = []
    for name, size, mtime in sorted(entries, key=lambda e: e[2], reverse=True):
        if keep_files < max_files and keep_bytes + size <= max_bytes and now - mtime <= ttl:
            keep_files += 1
            keep_bytes += size
        else:
            drop.append(name)
    return drop


class QuarantineDirs:
    """The quarantine dirs of every tier, with their bounds (per tier: files, bytes, seconds)."""

    def __init__(self, tiers: dict[str, Tier], limits: tuple[int, int, float]):
        self.tiers = tiers
        self.limits = limits
        for t in tiers.values():
            t.quarantine.mkdir(parents=True, exist_ok=True)

    def files(self, tier: Tier) -> list[tuple[Path, int, float]]:
        """(path, bytes, mtime) of every file in a tier's quarantine dir."""
        out = []
        for path in tier.quarantine.iterdir():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((path, st.st_size, st.st_mtime))
        return out

    def move_in(self, tier: Tier, blob_path: Path, blob_id: str, cached: int) -> None:
        """Move a blob file aside; the tier's usage trades its `cached` bytes for the file's."""
        dest = tier.quarantine / blob_id
        replaced = dest.stat().st_size if dest.exists() else 0
        tier.used -= cached + replaced
        try:
            os.replace(blob_path, dest)
            os.utime(dest)  # its age in quarantine starts now
            tier.used += dest.stat().st_size
        except FileNotFoundError:
            pass

    def unlink(self, tier: Tier, path: Path, size: int) -> int:
        path.unlink(missing_ok=True)
        tier.used -= size
        log.info("removed quarantined %s (%d bytes) from %s", path.name, size, tier.name)
        return size

    def clean(self, now: float | None = None) -> int:
        """Enforce the bounds on every tier; returns bytes freed."""
        now = time.time() if now is None else now
        freed = 0
        for tier in self.tiers.values():
            found = self.files(tier)
            by_name = {path.name: (path, size) for path, size, _ in found}
            listed = [(path.name, size, mtime) for path, size, mtime in found]
            for name in quarantine_excess(listed, now, *self.limits):
                freed += self.unlink(tier, *by_name[name])
        return freed

    def usage(self) -> dict[str, tuple[int, int]]:
        """tier name -> (files, bytes) in quarantine."""
        out = {}
        for name, tier in self.tiers.items():
            found = self.files(tier)
            out[name] = (len(found), sum(size for _, size, _ in found))
        return out

    def discard(self, blob_id: str) -> None:
        """Empty a quarantined file that readers still have open in passthrough mode: the
        kernel reads it directly, so truncating it is the only way to stop them (they see
        end of file, never the wrong bytes). Its evidence is lost."""
        for tier in self.tiers.values():
            path = tier.quarantine / validate_blob_id(blob_id)
            try:
                size = path.stat().st_size
                os.truncate(path, 0)
            except FileNotFoundError:
                continue
            self.unlink(tier, path, size)
