"""Compile-cache snapshots in S3 (`compile_cache_upstream: s3://bucket/prefix`), so a new cluster starts warm.

Layout under the prefix, everything content-addressed:
  blobs/<sha256>                                  file contents
  keys/<key name>/<sealed_at µs, 20 digits>-<manifest id>.json   sealed manifests

A node that sealed a snapshot uploads the blobs the bucket's newest manifest
of that key does not list, then the manifest (last, so a manifest never names
a blob that is not there). Manifests are never overwritten: two nodes sealing
the same key add two objects, and readers pick the newest by name, then check
that the document is what its name says (its sha256 and sealing time). The
bucket is trusted no more than a peer: manifests are parsed as hostile input,
every blob is checked by size and sha256 before a byte of it is kept.

boto3 blocks: every call runs on this upstream's own thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import ccmanifest as cm
from .ccmanifest import BadManifest, Manifest
from .upstream.s3 import make_client, prefixed
from .upstream.sourcespec import parse_s3_url

log = logging.getLogger(__name__)

MANIFEST_RE = re.compile(r"(\d{20})-([0-9a-f]{64})\.json")
CANDIDATES = 3  # newest manifest names tried before giving up on a key


class UpstreamFailed(Exception):
    """The bucket could not be read or written; the message says why (never a credential)."""


def manifest_name(m: Manifest) -> str:
    return f"{round(m.sealed_at * 1e6):020d}-{m.id}.json"


class S3Snapshots:
    name = "upstream"

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        workers: int = 32,
        on_verify_failure: Callable[[], None] | None = None,
    ):
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.endpoint_url, self.region, self.path_style = endpoint_url, region, path_style
        self.workers = workers
        self.on_verify_failure = on_verify_failure or (lambda: None)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nodecache-ccs3")
        self._client = None

    def _key(self, rel: str) -> str:
        return prefixed(self.prefix, rel)

    def _make_client(self):
        return make_client(self.endpoint_url, self.region, self.path_style, self.workers, 3, 60)

    async def _run(self, what: str, fn: Callable):
        """fn(client) on the pool; a boto3 failure becomes UpstreamFailed naming `what` and the error code."""
        from botocore.exceptions import BotoCoreError, ClientError

        def run():
            if self._client is None:
                self._client = self._make_client()
            return fn(self._client)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "error")
            raise UpstreamFailed(f"{self.url}: {what}: {code}") from None
        except BotoCoreError as e:
            raise UpstreamFailed(f"{self.url}: {what}: {e.__class__.__name__}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- reading -------------------------------------------------------------------

    async def _names(self, key: str) -> list[tuple[str, str]]:
        """(name, id) of the key's manifests in the bucket, newest first."""
        base = self._key(f"keys/{cm.key_name(key)}/")

        def listing(client) -> list[str]:
            out, token = [], None
            while True:
                kw = {"Bucket": self.bucket, "Prefix": base, **({"ContinuationToken": token} if token else {})}
                page = client.list_objects_v2(**kw)
                out += [o["Key"][len(base) :] for o in page.get("Contents", [])]
                if not page.get("IsTruncated") or len(out) > 100_000:
                    return out
                token = page.get("NextContinuationToken")

        names = [
            (n, match.group(2))
            for n in await self._run("list manifests", listing)
            if (match := MANIFEST_RE.fullmatch(n))
        ]
        return sorted(names, reverse=True)

    async def newest(self, key: str) -> Manifest | None:
        """The newest intact manifest of the key in the bucket, or None (none there, or none readable)."""
        base = self._key(f"keys/{cm.key_name(key)}/")
        for name, want_id in (await self._names(key))[:CANDIDATES]:

            def get(client, name=name) -> bytes:
                r = client.get_object(Bucket=self.bucket, Key=base + name)
                with r["Body"] as body:
                    return body.read(cm.MAX_MANIFEST + 1)

            try:
                m = cm.parse(await self._run(f"get manifest {name}", get), key)
                if m.id != want_id or manifest_name(m) != name:
                    raise BadManifest("its content is not what its name says")
                return m
            except BadManifest as e:
                log.warning("compile cache %s: refused manifest %s of %s: %s", key, name, self.url, e)
                self.on_verify_failure()
            except UpstreamFailed as e:
                log.warning("compile cache %s: %s", key, e)
        return None

    def _get_verified(self, client, sha: str, size: int, dest: Path | None) -> bytes | bool:
        r = client.get_object(Bucket=self.bucket, Key=self._key(f"blobs/{sha}"))
        h, n, parts = hashlib.sha256(), 0, []
        with r["Body"] as body, open(dest, "wb") if dest else contextlib.nullcontext() as out:
            while chunk := body.read(1 << 20):
                n += len(chunk)
                if n > size:
                    break
                h.update(chunk)
                if dest:
                    out.write(chunk)
                else:
                    parts.append(chunk)
        if n != size or h.hexdigest() != sha:
            log.warning("compile-cache blob %s from %s failed verification", sha[:12], self.url)
            self.on_verify_failure()
            return False
        return True if dest else b"".join(parts)

    async def fetch_small(self, items: list[tuple[str, int]], i: int) -> dict[str, bytes]:
        """One batch of small blobs (a GET each, on the pool), each verified; what fails is left out."""

        async def one(sha: str, size: int) -> tuple[str, bytes | None]:
            try:
                data = await self._run(f"get blob {sha[:12]}", lambda c: self._get_verified(c, sha, size, None))
            except (UpstreamFailed, OSError) as e:
                log.info("compile-cache blob %s: %s", sha[:12], e)
                data = None
            return sha, data or None

        return {sha: data for sha, data in await asyncio.gather(*(one(s, n) for s, n in items)) if data}

    async def fetch_blob(self, sha: str, size: int, dest: Path) -> bool:
        try:
            return bool(await self._run(f"get blob {sha[:12]}", lambda c: self._get_verified(c, sha, size, dest)))
        except (UpstreamFailed, OSError) as e:
            log.info("compile-cache blob %s: %s", sha[:12], e)
            return False

    # -- writing -------------------------------------------------------------------

    async def publish(self, m: Manifest, blob_path: Callable[[str], Path | None]) -> int:
        """Upload the snapshot: blobs the bucket's newest manifest of the key does not list, then the manifest.
        Returns the blobs uploaded; UpstreamFailed if any upload failed (the manifest is then not written)."""
        have: set[str] = set()
        with_key = await self.newest(m.key)
        if with_key is not None:
            if with_key.id == m.id:
                return 0
            have = with_key.blobs()
        todo = sorted(m.blobs() - have)
        sem = asyncio.Semaphore(self.workers)

        async def put(sha: str) -> None:
            path = blob_path(sha)
            if path is None:
                raise UpstreamFailed(f"blob {sha[:12]} of {m.key!r} is no longer on this node")
            async with sem:

                def upload(client) -> None:
                    with open(path, "rb") as f:
                        client.put_object(Bucket=self.bucket, Key=self._key(f"blobs/{sha}"), Body=f)

                await self._run(f"put blob {sha[:12]}", upload)

        await asyncio.gather(*(put(sha) for sha in todo))
        key = self._key(f"keys/{cm.key_name(m.key)}/{manifest_name(m)}")
        doc = m.dump()
        await self._run(
            "put manifest",
            lambda c: c.put_object(Bucket=self.bucket, Key=key, Body=doc, ContentType="application/json"),
        )
        return len(todo)
