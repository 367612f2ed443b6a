"""Which chunks of a blob are on disk and recorded: the in-memory mirror of the index."""

from __future__ import annotations

from .index import BlobRecord


class BlobState:
    """In-memory presence of a blob's chunks; mirrors the index."""

    def __init__(self, rec: BlobRecord, present: dict[int, int]):
        self.rec = rec
        self.present = bytearray(rec.n_chunks)
        for i in present:
            if i < rec.n_chunks:
                self.present[i] = 1
        self.missing = rec.n_chunks - sum(self.present)
        self.cached = sum(self.chunk_len(i) for i in range(rec.n_chunks) if self.present[i])

    def chunk_len(self, index: int) -> int:
        start, end = self.chunk_range(index)
        return end - start

    def has(self, index: int) -> bool:
        return bool(self.present[index])

    def mark(self, index: int) -> None:
        if not self.present[index]:
            self.present[index] = 1
            self.missing -= 1
            self.cached += self.chunk_len(index)

    def unmark(self, index: int) -> None:
        if self.present[index]:
            self.present[index] = 0
            self.missing += 1
            self.cached -= self.chunk_len(index)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = index * self.rec.chunk_size
        return start, min(start + self.rec.chunk_size, self.rec.size)
