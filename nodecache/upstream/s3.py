"""S3 (and S3-compatible: MinIO, Ceph, moto) as an upstream, through boto3.

boto3 blocks, so every call runs on this upstream's own thread pool, never on
the event loop and never on the default executor the store writes through.
Credentials, region and endpoint come from the standard boto3 chain unless
configured (`s3_endpoint_url`, `s3_region`, `s3_path_style` for MinIO).

A prefix is listed into a snapshot (see `manifest`): a manifest, an HF cache
copy or an `hf download --local-dir` copy keeps its real ids; otherwise ids
come from `x-amz-checksum-sha256` when the object has a full-object checksum,
else they are source-identified from (bucket, key, ETag, size). Every ranged
GetObject carries `If-Match: <ETag seen at listing>`, so a chunk can never mix
bytes of two versions of an object.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from ..metrics import Metrics
from . import NotFound, UpstreamError
from .listing import ListingUpstream
from .manifest import Reader, SourceFile, SourceObject, checksum_sha256
from .sourcespec import parse_s3_url

log = logging.getLogger(__name__)

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}


def make_client(
    endpoint_url: str | None, region: str | None, path_style: bool, pool: int, attempts: int, read_timeout: float
):
    """A boto3 S3 client with the node's S3 settings (s3_endpoint_url, s3_region, s3_path_style); boto3 is
    imported here, on first use, as it takes a while."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        s3={"addressing_style": "path" if path_style else "auto"},
        retries={"max_attempts": attempts, "mode": "standard"},
        max_pool_connections=pool,
        connect_timeout=10,
        read_timeout=read_timeout,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def prefixed(prefix: str, rel: str) -> str:
    """The object key of `rel` under a bucket prefix ("" for none)."""
    return f"{prefix}/{rel}" if prefix else rel


class S3Upstream(ListingUpstream):
    name = "s3"

    def __init__(
        self,
        url: str,
        metrics: Metrics,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        max_workers: int = 16,
    ):
        super().__init__(url)
        self.bucket, self.prefix = parse_s3_url(url)
        self.metrics = metrics
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.path_style = path_style
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="nodecache-s3")
        self._client = None
        self._max_workers = max_workers

    def _key(self, rel: str) -> str:
        return prefixed(self.prefix, rel)

    def _make_client(self):
        # two attempts: the fill path does its own retries
        return make_client(self.endpoint_url, self.region, self.path_style, self._max_workers, 2, 30)

    async def _call(self, what: str, fn, **kw):
        """One boto3 call on the pool, its failure mapped to NotFound/UpstreamError."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        def run():
            if self._client is None:
                self._client = self._make_client()
            return getattr(self._client, fn)(**kw)

        try:
            out = await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            self.metrics.upstream_requests.labels(str(status or code)).inc()
            if code == "NoSuchBucket":
                raise NotFound(f"s3://{self.bucket}: bucket does not exist") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"{what}: no such object") from None
            if code in _DENIED or status == 403:
                raise NotFound(f"{what}: access denied ({code}); check the S3 credentials") from None
            if code == "PreconditionFailed" or status == 412:
                raise NotFound(f"{what}: the object changed since it was listed") from None
            raise UpstreamError(f"{what}: {code or 'error'} (HTTP {status})") from None
        except NoCredentialsError:
            raise NotFound(f"{what}: no S3 credentials (standard boto3 chain found none)") from None
        except BotoCoreError as e:
            raise UpstreamError(f"{what}: {e.__class__.__name__}: {e}") from None
        self.metrics.upstream_requests.labels(str(out.get("ResponseMetadata", {}).get("HTTPStatusCode", 200))).inc()
        return out

    async def _list(self, read: Reader) -> list[SourceObject]:
        base = self._key("") if self.prefix else ""
        objects: list[SourceObject] = []
        checked: list[int] = []
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": base}
            if token:
                kw["ContinuationToken"] = token
            page = await self._call(f"{self.url}: list", "list_objects_v2", **kw)
            for o in page.get("Contents", []):
                key = o["Key"]
                if key.endswith("/") or not key.startswith(base):
                    continue
                if "SHA256" in (o.get("ChecksumAlgorithm") or []):
                    checked.append(len(objects))
                objects.append(SourceObject(key[len(base) :], int(o["Size"]), o.get("ETag", "").strip('"')))
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        if not objects:
            raise NotFound(f"{self.url}: no objects under this prefix")
        # Listings name the checksum algorithm, not the value: one HEAD per such object.
        heads = await asyncio.gather(*(self._head(objects[i]) for i in checked))
        for i, sha in zip(checked, heads, strict=True):
            if sha:
                o = objects[i]
                objects[i] = SourceObject(o.key, o.size, o.version, sha)
        return objects

    async def _head(self, o: SourceObject) -> str | None:
        h = await self._call(
            f"{self.url}/{o.key}", "head_object", Bucket=self.bucket, Key=self._key(o.key), ChecksumMode="ENABLED"
        )
        if h.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
            return None
        return checksum_sha256(h.get("ChecksumSHA256"))

    async def _read_small(self, key: str) -> bytes:
        out = await self._call(f"{self.url}/{key}", "get_object", Bucket=self.bucket, Key=self._key(key))
        return await asyncio.get_running_loop().run_in_executor(self._pool, _read_body, out["Body"])

    async def _read_range(self, f: SourceFile, start: int, end: int) -> bytes:
        kw = {"Bucket": self.bucket, "Key": self._key(f.key), "Range": f"bytes={start}-{end - 1}"}
        if f.version:
            kw["IfMatch"] = f'"{f.version}"'
        what = f"{self.url}/{f.key} [{start}-{end})"
        out = await self._call(what, "get_object", **kw)
        cr = out.get("ContentRange", "")
        if cr and not cr.startswith(f"bytes {start}-{end - 1}/"):
            out["Body"].close()
            raise UpstreamError(f"{what}: wrong Content-Range {cr!r}")
        try:
            data = await asyncio.get_running_loop().run_in_executor(self._pool, _read_body, out["Body"])
        except Exception as e:  # a reset or timeout mid-body
            raise UpstreamError(f"{what}: {e.__class__.__name__}: {e}") from None
        self.metrics.upstream_bytes.labels(self.name).inc(len(data))
        return data

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _read_body(body) -> bytes:
    with body:
        return body.read()
