"""moto in server mode on 127.0.0.1, as a real S3 endpoint for tests and benchmarks.

Started as a subprocess (`python -m moto.server`), stopped by its PID. boto3
clients reach it like any S3-compatible endpoint (path-style, fixed fake
credentials exported through the environment of whoever talks to it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

from nodecache.testing.daemon import free_port, stop_process

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key-never-logged"
REGION = "us-east-1"


class MotoServer:
    """`with MotoServer() as s3: s3.client().create_bucket(...)`; `s3.env` for daemons."""

    def __init__(self, log_path: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a daemon needs to reach this server through the standard boto3 chain."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "NODECACHE_S3_ENDPOINT_URL": self.url,
            "NODECACHE_S3_PATH_STYLE": "true",
        }

    def start(self, timeout: float = 30.0) -> Self:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/moto-api/data.json", timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server not up after {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc, 5)
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def reset(self) -> None:
        """Forget every bucket (moto's own reset endpoint)."""
        urllib.request.urlopen(urllib.request.Request(self.url + "/moto-api/reset", method="POST"), timeout=5).close()


def upload_dir(client, bucket: str, prefix: str, root: Path, checksum: bool = False) -> dict[str, int]:
    """Upload every file under `root` to `s3://bucket/prefix/...`; {relpath: size}."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        key = f"{prefix}/{rel}" if prefix else rel
        extra = {"ChecksumAlgorithm": "SHA256"} if checksum else {}
        with open(path, "rb") as f:
            client.put_object(Bucket=bucket, Key=key, Body=f, **extra)
        out[rel] = path.stat().st_size
    return out
