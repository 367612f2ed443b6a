"""Test helpers for nodecache: a local HuggingFace Hub emulator (see `hub`)."""
