#!/usr/bin/env python3
"""A TCP relay that limits each connection's download rate, for the download benchmark.

Real S3 serves one connection at a rate well below what a host's network can take (that
is why clients split large objects into ranged parts); a loopback S3Proxy does not: there
the disk and the CPU are the limit. This relay puts a per-connection limit back, so that
the benchmark can also compare clients where the network is the limit.

  throttle_relay.py --listen PORT --upstream HOST:PORT --rate MIB_PER_S

Bytes from the upstream to the client are paced per connection with a token bucket that
starts empty and holds at most a tenth of a second's worth: a new connection gets no head
start, so splitting an object into many short requests gains nothing by itself. Bytes to
the upstream pass unpaced. Prints "ready" once listening.
"""
import argparse
import asyncio
import time

CHUNK = 64 * 1024


async def pump(reader, writer, rate):
    """Copy until EOF; with @rate (bytes/s), never faster than that on average."""
    burst = rate / 10.0
    allowance = 0.0
    last = time.monotonic()
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            if rate:
                now = time.monotonic()
                allowance = min(burst, allowance + (now - last) * rate)
                last = now
                allowance -= len(data)
                if allowance < 0:
                    await asyncio.sleep(-allowance / rate)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except ConnectionError:
            pass


async def handle(client_reader, client_writer, upstream, rate):
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pump(client_reader, up_writer, 0),
                         pump(up_reader, client_writer, rate))


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--rate", type=float, required=True, help="MiB/s per connection")
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    rate = int(args.rate * 1024 * 1024)
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, (host, int(port)), rate), "127.0.0.1", args.listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
