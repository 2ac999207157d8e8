"""The averaging byte pattern over plain TCP sockets: the yardstick for the all-reduce.

Each of N processes sends S/N bytes to every other process and receives as much from each
(reduce-scatter), then does it again (all-gather): 2(N-1)/N * S bytes out and in per peer,
with no encryption, no framing beyond the socket, no arithmetic. Run by
``averaging_throughput.py``: every process prints ``port <p>``, reads the list of all
endpoints and ``go`` on stdin, and prints the seconds both phases took.
"""

from __future__ import annotations

import argparse
import sys
import time

import trio

BLOCK = 4 << 20


async def exchange(peers: list[trio.SocketStream], share: int) -> None:
    payload = memoryview(bytes(min(share, BLOCK)))

    async def send(stream: trio.SocketStream) -> None:
        left = share
        while left:
            n = min(left, len(payload))
            await stream.send_all(payload[:n])
            left -= n

    async def receive(stream: trio.SocketStream) -> None:
        left = share
        while left:
            data = await stream.receive_some(min(left, BLOCK))
            if not data:
                raise ConnectionError("peer closed early")
            left -= len(data)

    async with trio.open_nursery() as nursery:
        for stream in peers:
            nursery.start_soon(send, stream)
            nursery.start_soon(receive, stream)


async def main(args: argparse.Namespace) -> None:
    listeners = await trio.open_tcp_listeners(0, host=args.ip)
    port = listeners[0].socket.getsockname()[1]
    print(f"port {port}", flush=True)
    endpoints = (await trio.to_thread.run_sync(sys.stdin.readline)).split()
    me = f"{args.ip}:{port}"
    index = endpoints.index(me)
    inbound: list[trio.SocketStream] = []
    got_all = trio.Event()

    async def accept(stream: trio.SocketStream) -> None:
        inbound.append(stream)
        if len(inbound) == index:
            got_all.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, accept, listeners)
        outbound = []
        for endpoint in endpoints[index + 1 :]:
            host, p = endpoint.rsplit(":", 1)
            outbound.append(await trio.open_tcp_stream(host, int(p)))
        if index:
            await got_all.wait()
        peers = inbound + outbound
        await trio.to_thread.run_sync(sys.stdin.readline)
        share = args.size // len(endpoints)
        start = time.perf_counter()
        await exchange(peers, share)
        await exchange(peers, share)
        print(f"seconds {time.perf_counter() - start}", flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--size", type=int, required=True, help="bytes per peer")
    trio.run(main, parser.parse_args())
