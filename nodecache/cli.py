"""`nodecache` command line: serve, prefetch, demo.

Exit codes: 0 ok, 1 error (one line on stderr, never a traceback), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from . import config as config_mod
from .fill import FillError
from .layout import InvalidName
from .upstream import UpstreamError


class CliError(Exception):
    """A failure to report as one line and exit 1."""


class Progress:
    """A one-line progress bar on stderr: percent, bytes, rate, ETA."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.start = time.monotonic()
        self._last_print = 0.0
        self.tty = stream.isatty()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_print < (0.2 if self.tty else 2.0):
            return
        self._last_print = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        frac = done / self.total if self.total else 1.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        bar = "#" * int(frac * 30)
        eta = f"ETA {(self.total - done) / rate:,.0f}s" if rate > 0 else ""
        line = f"{self.label} [{bar:<30}] {frac * 100:5.1f}% {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB {rate / 1e6:,.1f} MB/s {eta}"
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def _cfg(args: argparse.Namespace) -> config_mod.Config:
    token = Path(args.token_file).read_text().strip() if getattr(args, "token_file", None) else None
    return config_mod.load(
        {
            "mount": getattr(args, "mount", None),
            "cache_dir": args.cache_dir,
            "repos": tuple(getattr(args, "repo", None) or ()) or None,
            "hub_url": args.hub_url,
            "hub_token": token,
            "listen": getattr(args, "listen", None),
            "read_timeout": getattr(args, "read_timeout", None),
            "fill_on_open": False if getattr(args, "no_fill_on_open", False) else None,
        }
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from . import daemon

    cfg = _cfg(args)
    if cfg.mount is None:
        raise CliError("serve needs --mount (or NODECACHE_MOUNT)")
    daemon.run(cfg)
    return 0


async def _prefetch_standalone(cfg: config_mod.Config, spec: str) -> None:
    from .daemon import Daemon

    d = Daemon(cfg)
    await d.open()
    try:
        ref, total, blobs = await d.add_repo(spec)
        bar = Progress(total, f"{ref.repo_id}@{ref.revision}")
        await d.filler.fill_blobs(blobs, bar.update)
        bar.update(total, final=True)
        print(f"ready: {ref} {len(set(blobs))} blobs, {total:,} bytes verified in {cfg.cache_dir}")
    finally:
        await d.close()


async def _prefetch_remote(endpoint: str, spec: str) -> None:
    import aiohttp

    repo, _, revision = spec.partition("@")
    body = {"repo": repo, "revision": revision or None}
    bar = None
    async with aiohttp.ClientSession() as s:
        async with s.post(endpoint.rstrip("/") + "/v1/prefetch", json=body) as resp:
            if resp.status >= 400:
                detail = (await resp.json(content_type=None)).get("detail", resp.reason)
                raise CliError(f"daemon answered {resp.status}: {detail}")
            async for line in resp.content:
                msg = json.loads(line)
                if "commit" in msg:
                    bar = Progress(msg["total"], f"{msg['repo']}@{msg['revision']}")
                    head = msg
                elif bar is not None:
                    bar.update(msg["done"], final="state" in msg)
                if msg.get("state") == "error":
                    raise CliError(msg["error"])
                if msg.get("state") == "ready":
                    print(
                        f"ready: {head['repo']}@{head['revision']} ({head['commit'][:12]}) {msg['total']:,} bytes verified"
                    )
                    return
    raise CliError("daemon closed the stream before the prefetch finished")


def cmd_prefetch(args: argparse.Namespace) -> int:
    if args.endpoint:
        asyncio.run(_prefetch_remote(args.endpoint, args.spec))
    else:
        asyncio.run(_prefetch_standalone(_cfg(args), args.spec))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(Path(args.workdir), keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodecache", description="Per-node HuggingFace model cache over FUSE.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cache-dir", help="index + blob store (default /var/lib/nodecache)")
        sp.add_argument("--hub-url", help="upstream Hub endpoint (default $HF_ENDPOINT or https://huggingface.co)")
        sp.add_argument("--token-file", help="file holding the HF token (a mounted Secret)")

    s = sub.add_parser("serve", help="mount the cache and serve health/metrics/API")
    common(s)
    s.add_argument("--mount", help="FUSE mountpoint; its hub/ is an HF_HUB_CACHE")
    s.add_argument("--repo", action="append", help="[datasets/]org/name[@rev] to resolve at start (repeatable)")
    s.add_argument("--listen", help="HOST:PORT for /healthz /readyz /metrics /v1 (default 127.0.0.1:8470)")
    s.add_argument("--read-timeout", type=float, help="seconds a read may wait for its bytes before EIO")
    s.add_argument("--no-fill-on-open", action="store_true", help="fetch only what is read (plus read-ahead)")
    s.set_defaults(fn=cmd_serve)

    f = sub.add_parser("prefetch", help="fill a repo completely (standalone, or through --endpoint)")
    common(f)
    f.add_argument("spec", help="[datasets/]org/name[@rev]")
    f.add_argument("--endpoint", help="a running daemon, e.g. http://127.0.0.1:8470")
    f.set_defaults(fn=cmd_prefetch)

    d = sub.add_parser("demo", help="serve the bundled all-MiniLM-L6-v2 through the Hub emulator, mount, list, load")
    d.add_argument("--workdir", default="/tmp/nodecache-demo")
    d.add_argument("--keep", action="store_true", help="keep serving until Ctrl-C")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (CliError, config_mod.ConfigError, InvalidName, UpstreamError, FillError, OSError) as e:
        print(f"nodecache: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
