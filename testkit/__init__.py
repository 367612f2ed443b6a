"""Test and bench helpers that are not part of the shipped package or image: a netns cluster, moto's S3
server, compile-cache-shaped trees and a lying peer. The Hub emulator and the daemon harness stay in
`nodecache.testing`, because `nodecache demo` runs them."""
