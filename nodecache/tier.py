"""Where blob files live: tiers (shm, disk) with a byte quota and watermarks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import Config


class NoSpace(Exception):
    """A tier cannot take more bytes, even after evicting everything evictable."""


@dataclass
class Tier:
    """One place blob files live (shm or disk), with a byte quota and watermarks.

    `used` counts bytes of chunks written (reserved before the write), so the
    quota is exceeded by at most the chunks in flight.
    """

    name: str
    root: Path
    quota: int = 0  # 0: the filesystem's size
    high: float = 0.9
    low: float = 0.8
    min_free: int = 0
    used: int = 0  # includes `quarantined`
    # Bytes of blobs placed here (Store.states), in use and not reserved yet: a placement counts them. Without,
    # a hot pin's blobs prepared together each found shm empty, all went there, and the pin's
    # fill ran shm full ("nothing more can be evicted") with the disk empty beside it.
    promised: int = 0

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    def blob_path(self, blob_id: str) -> Path:
        """The file of a (checked) blob id in this tier."""
        return self.blobs / blob_id[:2] / blob_id

    def capacity(self, st: os.statvfs_result | None = None) -> int:
        st = st or os.statvfs(self.root)
        size = st.f_blocks * st.f_frsize
        return min(self.quota, size) if self.quota else size

    def fs_free(self, st: os.statvfs_result | None = None) -> int:
        st = st or os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def most(self, fraction: float = 1.0) -> int:
        """The most bytes this tier can ever hold up to `fraction` of its capacity (the store
        fills a tier to all of it, the shm placement to its high watermark), min_free kept."""
        st = os.statvfs(self.root)
        return max(0, min(int(self.capacity(st) * fraction), st.f_blocks * st.f_frsize - self.min_free))

    def fits(self, n: int, fraction: float) -> bool:
        st = os.statvfs(self.root)  # one call, not two: every chunk written asks (a small file: every file)
        return self.used + n <= self.capacity(st) * fraction and self.fs_free(st) - n >= self.min_free


def configured_tiers(cfg: Config) -> list[Tier]:
    """The node's tiers, shm first when there is one."""
    marks = (cfg.high_watermark, cfg.low_watermark, cfg.min_free)
    tiers = [Tier("disk", cfg.cache_dir, cfg.disk_max, *marks)]
    if cfg.shm_dir is not None:
        tiers.insert(0, Tier("shm", cfg.shm_dir, cfg.shm_max, *marks))
    return tiers


def shortfall(sizes: list[int], disk: int, shm: int, shm_file_max: int, hot: bool, held: int = 0) -> int:
    """Bytes of these blobs that no placement can hold at once (0: perhaps they fit): `disk` and
    `shm` are the most each tier can hold (Tier.most). A blob goes whole to one tier: to shm only
    if it is small (up to `shm_file_max`) or `hot`, and shm has room for it, else to disk
    (Pins.place). `held`: bytes the pins of other revisions keep (never evicted), counted in shm
    first (of all the ways they may lie, the one that leaves these the most room). A bound, not
    a packing: what it refuses can never be whole while those pins stay."""
    may_shm = sum(n for n in sizes if n <= shm and (hot or n <= shm_file_max))
    in_shm = min(held, shm)
    return max(0, sum(sizes) - max(0, disk - (held - in_shm)) - min(shm - in_shm, may_shm))
