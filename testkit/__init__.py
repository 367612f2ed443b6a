"""Test and bench helpers that are not part of the shipped package or image: a netns cluster, moto's S3
server, compile-cache-shaped trees, a lying peer and a reader that must not notice daemon restarts. The Hub emulator and the daemon harness stay in
`nodecache.testing`, because `nodecache demo` runs them."""

from pathlib import Path

READER = Path(__file__).with_name("reader.py")  # run by path: a subprocess need not have the repo on sys.path
