"""nodecache: a per-node HuggingFace model cache served as a read-only FUSE hub cache."""

__version__ = "0.1.0"
