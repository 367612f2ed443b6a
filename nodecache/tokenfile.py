"""Secrets kept in files (mounted Kubernetes Secrets): one reader for every token and header file."""

from __future__ import annotations

from pathlib import Path


def read_secret(path: str | Path) -> str:
    """The file's text without its line end; ValueError names the file, never the content."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not text"
        raise ValueError(f"cannot read {path}: {reason}") from None
