"""Prometheus metrics of one daemon, in its own registry (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Every metric the daemon exports, named as DESIGN §9 lists them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "nodecache_"
        self.read_bytes = Counter(
            p + "read_bytes", "Bytes served to readers, by where they came from.", ["source"], registry=r
        )
        self.fuse_requests = Counter(p + "fuse_requests", "FUSE requests handled, by operation.", ["op"], registry=r)
        self.fuse_errors = Counter(
            p + "fuse_errors", "FUSE requests answered with an error, by errno name.", ["errno"], registry=r
        )
        self.fuse_opens = Counter(
            p + "fuse_opens",
            "File opens: passthrough (the kernel reads the store file) or served (reads come to the daemon).",
            ["mode"],
            registry=r,
        )
        self.fuse_read_seconds = Histogram(
            p + "fuse_read_seconds",
            "Latency of FUSE read requests.",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=r,
        )
        self.upstream_bytes = Counter(p + "upstream_bytes", "Bytes fetched from upstream.", ["upstream"], registry=r)
        self.upstream_requests = Counter(
            p + "upstream_requests", "Upstream HTTP requests, by status code.", ["code"], registry=r
        )
        self.upstream_chained = Counter(
            p + "upstream_requests_chained",
            "Data requests sent on a connection as soon as its previous range was read (receive.py).",
            registry=r,
        )
        self.verify_failures = Counter(
            p + "verify_failures", "Blobs or chunks that failed verification.", ["source"], registry=r
        )
        self.page_cache_invalidations = Counter(
            p + "page_cache_invalidations",
            "Inodes whose pages the kernel dropped because their blob failed verification.",
            registry=r,
        )
        self.scrubbed_bytes = Counter(
            p + "scrubbed_bytes", "Bytes of complete blobs re-hashed (background scrub and verify jobs).", registry=r
        )
        self.fill_inflight = Gauge(p + "fill_inflight", "Chunk fetches in flight.", registry=r)
        self.read_wait_seconds = Histogram(
            p + "read_wait_seconds",
            "Time a read (FUSE, mirror, a peer asking) waited for chunks that were not local yet.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30, 120),
            registry=r,
        )
        self.fill_slot_wait_seconds = Histogram(
            p + "fill_slot_wait_seconds",
            "Time a chunk request waited for one of the node's parallel_total fetch slots, by priority.",
            ["priority"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30),
            registry=r,
        )
        self.coalesced_waits = Counter(
            p + "coalesced_waits", "Reads that joined a fetch already in flight.", registry=r
        )
        self.cache_bytes = Gauge(
            p + "cache_bytes", "Bytes of chunks stored (or being written), by tier.", ["tier"], registry=r
        )
        self.cache_capacity_bytes = Gauge(
            p + "cache_capacity_bytes", "Byte capacity of each tier (quota or filesystem size).", ["tier"], registry=r
        )
        self.quarantine_bytes = Gauge(
            p + "quarantine_bytes",
            "Bytes of blobs that failed their proof, kept for inspection (part of cache_bytes), by tier.",
            ["tier"],
            registry=r,
        )
        self.quarantine_files = Gauge(
            p + "quarantine_files", "Blobs that failed their proof, kept for inspection, by tier.", ["tier"], registry=r
        )
        self.evictions = Counter(p + "evictions", "Blobs evicted, by tier.", ["tier"], registry=r)
        self.evicted_bytes = Counter(p + "evicted_bytes", "Bytes evicted, by tier.", ["tier"], registry=r)
        self.fills_yielded = Counter(
            p + "fills_yielded", "Whole-blob fills nobody read, stopped for a reader's room.", registry=r
        )
        self.repo_cached_ratio = Gauge(
            p + "repo_cached_ratio",
            "Fraction of a pinned repo's current snapshot that is cached.",
            ["repo"],
            registry=r,
        )
        self.jobs = Gauge(p + "prefetch_jobs", "Prefetch jobs, by state.", ["state"], registry=r)
        self.compile_cache_bytes = Gauge(
            p + "compile_cache_bytes", "Bytes of compile-cache trees and sealed blobs on this node.", registry=r
        )
        self.compile_caches = Gauge(
            p + "compile_caches", "Compile-cache keys on this node, by state (in_use, idle).", ["state"], registry=r
        )
        self.compile_cache_events = Counter(
            p + "compile_cache_events",
            "Compile-cache seals, fills from peers, fill timeouts, evictions.",
            ["event"],
            registry=r,
        )
        self.compile_cache_publishes = Counter(
            p + "compile_cache_publishes",
            "Compile-cache volumes published, by how the tree was found.",
            ["filled"],
            registry=r,
        )
        self.peer_bytes_sent = Counter(p + "peer_bytes_sent", "Chunk bytes served to peers.", registry=r)
        self.peer_bytes_received = Counter(
            p + "peer_bytes_received", "Verified chunk bytes fetched from peers.", registry=r
        )
        self.peer_fetch_seconds = Histogram(
            p + "peer_fetch_seconds",
            "Latency of chunk fetches from peers.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.peer_fallbacks = Counter(
            p + "peer_fallbacks",
            "Peer fetches that fell through to the next source, by reason.",
            ["reason"],
            registry=r,
        )
        self.peers = Gauge(p + "peers", "Cluster members known, by health.", ["state"], registry=r)
        self.blobs = Gauge(p + "blobs", "Blobs known to the index, by state.", ["state"], registry=r)
        self.index_invalid = Counter(
            p + "index_invalid_entries",
            "Index entries that failed their check on load and were dropped.",
            ["db"],
            registry=r,
        )
        self.housekeeping_errors = Counter(
            p + "housekeeping_errors", "Housekeeping rounds that failed (logged; the loop goes on).", registry=r
        )

    def evicted(self, tier: str, nbytes: int) -> None:
        """One blob evicted from `tier` (the store's on_evict)."""
        self.evictions.labels(tier).inc()
        self.evicted_bytes.labels(tier).inc(nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
