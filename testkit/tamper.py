"""A peer with bad memory or disk, seen from outside: a reverse proxy in front of a node.

The node listens on another port and advertises the proxy's address, so its
peers reach it only through here. While tampering is on, the last byte of
every successful peer-data answer (model chunks, compile-cache blobs and
batches) is flipped; everything else passes unchanged. The daemon itself
carries no fault switch: this is how a test makes one of them lie.

    python testkit/tamper.py --listen HOST:PORT --to HOST:PORT [--on]
    POST /_tamper {"on": true|false}   (answered by the proxy itself)
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web

PEER_DATA = ("/v1/blobs/", "/v1/compile-caches/peer/blobs")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


def flipped(body: bytes) -> bytes:
    return body[:-1] + bytes([body[-1] ^ 0x01]) if body else body


def make_app(target: str, on: bool) -> web.Application:
    state = {"on": on}

    async def switch(request: web.Request) -> web.Response:
        state["on"] = bool((await request.json()).get("on"))
        return web.json_response(state)

    async def forward(request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with session.request(
            request.method, f"http://{target}{request.rel_url}", headers=headers, data=await request.read()
        ) as r:
            body = await r.read()
            if state["on"] and r.status == 200 and request.path.startswith(PEER_DATA):
                body = flipped(body)
            out = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=r.status, body=body, headers=out)

    async def session_ctx(app: web.Application):
        app["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app["session"].close()

    app = web.Application(client_max_size=1 << 30)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/_tamper", switch)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(listen: str, target: str, on: bool) -> None:
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(make_app(target, on))
    await runner.setup()
    await web.TCPSite(runner, host, int(port)).start()
    print(f"tamper listening on {listen} -> {target}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python testkit/tamper.py", description=__doc__)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="the node behind the proxy")
    parser.add_argument("--on", action="store_true", help="tamper from the start")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.to, args.on))


if __name__ == "__main__":
    main()
