#!/usr/bin/env python3
"""A fault-injecting HTTP/1.1 proxy for the download tests.

It sits on a loopback port in front of S3Proxy and forwards requests one by one (keep-alive
connections carry several), so that a fault hits exactly the request it was armed for:

  cut N [METHOD] [SKIP]
                       the next METHOD (default GET) response, after letting SKIP such
                       requests through untouched, is cut after N bytes (status line and
                       headers included): the connection just closes
  slowdown K           the next K requests, any method, get "503 SlowDown" from the proxy
  error STATUS [METHOD] [DELAY]
                       the next METHOD (default GET) request is answered by the proxy with
                       STATUS and an S3 error document, after DELAY seconds (default 0)
  stall T [AFTER] [METHOD]
                       the next METHOD (default GET) response pauses T seconds after
                       AFTER bytes (default 0), then continues
  stalls T@AFTER [T@AFTER...] [METHOD]
                       the same with several pauses in the one response, in the order of
                       their AFTER byte counts (a resumable client checkpoints between them)
  release              every pause of a stall armed before this command ends now, whether
                       it is in progress or still to come; stalls armed later are not affected
  hold T [METHOD]      the next METHOD (default GET) request waits T seconds before it is
                       forwarded (the server sees it late)
  norange K            the next K GETs with a Range header get their 206 answer as a 200
                       without Content-Range, as from a server that ignores Range (the body
                       is still only the range: a correct client does not use it)
  stats                answered "ok inflight=N conns=M": the most requests in flight at
                       once and the connections accepted since the last stats
  clear                forget every armed fault

Commands arrive one per line on standard input; each is answered with "ok" (or
"error: ...") on standard output, so the test knows the fault is armed before it sends the
request. The first line on standard output is "port N". End of input stops the proxy.

Every request is appended to the --log file as one line:
  METHOD TARGET range=<Range or -> if-match=<If-Match or -> fault=<what was applied or ->
  host=<Host> token=<yes if x-amz-security-token was sent, else ->
"""

import argparse
import asyncio
import sys

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>FAULTPROXY503</RequestId></Error>"
)
HEAD_LIMIT = 64 * 1024
CHUNK = 64 * 1024


class Faults:
    def __init__(self):
        self.gate = asyncio.Event()  # set by "release": ends the pauses armed before it
        self.clear()

    def clear(self):
        self.cuts = []  # {"method", "nbytes", "skip"}
        self.stalls = []  # {"method", "points": [(seconds, after)...], "gate", "skip"}
        self.errors = []  # {"method", "status", "delay", "skip"}
        self.holds = []  # {"method", "seconds", "skip"}
        self.slowdown = 0
        self.norange = 0

    def command(self, line):
        words = line.split()
        if not words:
            return "ok"
        if words[0] == "cut" and 2 <= len(words) <= 4:
            skip = int(words[3]) if len(words) == 4 else 0
            method = words[2] if len(words) >= 3 else "GET"
            self.cuts.append({"method": method, "nbytes": int(words[1]), "skip": skip})
        elif words[0] == "slowdown" and len(words) == 2:
            self.slowdown += int(words[1])
        elif words[0] == "stall" and 2 <= len(words) <= 4:
            after = int(words[2]) if len(words) >= 3 else 0
            method = words[3] if len(words) == 4 else "GET"
            self.stalls.append({"method": method, "points": [(float(words[1]), after)],
                                "gate": self.gate, "skip": 0})
        elif words[0] == "stalls" and len(words) >= 2 and "@" in words[1]:
            method = "GET"
            if "@" not in words[-1]:
                method = words.pop()
            points = []
            for word in words[1:]:
                seconds, at, after = word.partition("@")
                if not at:
                    return "error: expected T@AFTER"
                points.append((float(seconds), int(after)))
            points.sort(key=lambda p: p[1])
            self.stalls.append({"method": method, "points": points, "gate": self.gate,
                                "skip": 0})
        elif words[0] == "release" and len(words) == 1:
            self.gate.set()
            self.gate = asyncio.Event()
        elif words[0] == "error" and 2 <= len(words) <= 4:
            method = words[2] if len(words) >= 3 else "GET"
            delay = float(words[3]) if len(words) == 4 else 0.0
            self.errors.append({"method": method, "status": int(words[1]), "delay": delay,
                                "skip": 0})
        elif words[0] == "hold" and 2 <= len(words) <= 3:
            method = words[2] if len(words) == 3 else "GET"
            self.holds.append({"method": method, "seconds": float(words[1]), "skip": 0})
        elif words[0] == "norange" and len(words) == 2:
            self.norange += int(words[1])
        elif words[0] == "clear":
            self.clear()
        else:
            return "error: unknown command"
        return "ok"

    def take(self, queue, method):
        for i, item in enumerate(queue):
            if item["method"] != method:
                continue
            if item["skip"] > 0:
                item["skip"] -= 1  # let this one through
                return None
            return queue.pop(i)
        return None


class Cut(Exception):
    pass


class Sink:
    """Writes a response to the client, applying a cut or stalls at byte offsets."""

    def __init__(self, writer, cut=None, stall=None):
        self.writer = writer
        self.sent = 0
        self.cut = cut
        self.points = list(stall["points"]) if stall else []  # (seconds, after), by after
        self.gate = stall["gate"] if stall else None

    async def send(self, data):
        while self.points and self.sent + len(data) >= self.points[0][1]:
            seconds, after = self.points.pop(0)
            head = max(0, after - self.sent)
            await self._write(data[:head])
            data = data[head:]
            try:
                await asyncio.wait_for(self.gate.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        if self.cut is not None and self.sent + len(data) >= self.cut:
            await self._write(data[: self.cut - self.sent])
            raise Cut()
        await self._write(data)

    async def _write(self, data):
        if data:
            self.writer.write(data)
            await self.writer.drain()
            self.sent += len(data)


def parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_head(reader):
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None


async def copy_body(reader, send, headers, has_body):
    """Forward one message body (Content-Length, chunked, or until EOF)."""
    if not has_body:
        return
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            await send(line)
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:
                    trailer = await reader.readuntil(b"\r\n")
                    await send(trailer)
                    if trailer == b"\r\n":
                        return
            await send(await reader.readexactly(size + 2))
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.readexactly(min(left, CHUNK))
            await send(data)
            left -= len(data)
    else:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return
            await send(data)


ERROR_CODES = {501: "NotImplemented", 503: "ServiceUnavailable"}


class Proxy:
    def __init__(self, upstream, log):
        self.upstream = upstream
        self.log = log
        self.faults = Faults()
        self.inflight = 0
        self.inflight_max = 0
        self.conns = 0

    def stats(self):
        answer = "ok inflight=%d conns=%d" % (self.inflight_max, self.conns)
        self.inflight_max = self.inflight
        self.conns = 0
        return answer

    def record(self, request_line, headers, fault):
        parts = request_line.split(" ")
        target = parts[1] if len(parts) > 1 else "?"
        self.log.write(
            "%s %s range=%s if-match=%s fault=%s host=%s token=%s\n"
            % (parts[0], target, headers.get("range", "-"), headers.get("if-match", "-"), fault,
               headers.get("host", "-"), "yes" if "x-amz-security-token" in headers else "-")
        )
        self.log.flush()

    async def error(self, client_writer, method, status):
        code = ERROR_CODES.get(status, "InternalError")
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code>'
                "<Message>injected by faultproxy</Message><RequestId>FAULTPROXY%d</RequestId>"
                "</Error>" % (code, status)).encode()
        head = ("HTTP/1.1 %d Injected\r\nContent-Type: application/xml\r\n"
                "x-amz-request-id: FAULTPROXY%d\r\nContent-Length: %d\r\n\r\n"
                % (status, status, len(body))).encode()
        client_writer.write(head if method == "HEAD" else head + body)
        await client_writer.drain()

    async def slowdown(self, client_writer, method):
        head = (
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
            "x-amz-request-id: FAULTPROXY503\r\nContent-Length: %d\r\n\r\n" % len(SLOWDOWN_BODY)
        ).encode()
        client_writer.write(head if method == "HEAD" else head + SLOWDOWN_BODY)
        await client_writer.drain()

    async def forward_response(self, up_reader, sink, method, norange=False):
        while True:
            head = await read_head(up_reader)
            if head is None:
                raise Cut()  # upstream went away: drop the client too
            status_line, headers = parse_head(head)
            status = int(status_line.split(" ")[1])
            if norange and status == 206:
                lines = head.decode("latin-1").split("\r\n")
                lines[0] = "HTTP/1.1 200 OK"
                lines = [l for l in lines if not l.lower().startswith("content-range:")]
                head = "\r\n".join(lines).encode("latin-1")
            await sink.send(head)
            if 100 <= status < 200:
                continue
            has_body = method != "HEAD" and status not in (204, 304)
            await copy_body(up_reader, sink.send, headers, has_body)
            return headers.get("connection", "").lower() == "close"

    async def one_request(self, reader, writer, upstream):
        head = await read_head(reader)
        if head is None:
            return False
        request_line, headers = parse_head(head)
        method = request_line.split(" ")[0]
        self.inflight += 1
        self.inflight_max = max(self.inflight_max, self.inflight)
        try:
            return await self.one_request_counted(reader, writer, upstream, head, request_line,
                                                  headers, method)
        finally:
            self.inflight -= 1

    async def one_request_counted(self, reader, writer, upstream, head, request_line, headers,
                                  method):
        error = self.faults.take(self.faults.errors, method)
        if error:
            self.record(request_line, headers, "error:%d" % error["status"])
            await copy_body(reader, lambda d: asyncio.sleep(0), headers, "content-length" in headers)
            await asyncio.sleep(error["delay"])
            await self.error(writer, method, error["status"])
            return True
        if self.faults.slowdown > 0:
            self.faults.slowdown -= 1
            self.record(request_line, headers, "slowdown")
            await copy_body(reader, lambda d: asyncio.sleep(0), headers, "content-length" in headers)
            await self.slowdown(writer, method)
            return True
        cut = self.faults.take(self.faults.cuts, method)
        stall = self.faults.take(self.faults.stalls, method)
        hold = self.faults.take(self.faults.holds, method)
        norange = False
        if method == "GET" and "range" in headers and self.faults.norange > 0:
            self.faults.norange -= 1
            norange = True
        fault = "-"
        if cut:
            fault = "cut:%d" % cut["nbytes"]
        elif stall:
            fault = "stall:" + ",".join("%g@%d" % p for p in stall["points"])
        elif hold:
            fault = "hold:%g" % hold["seconds"]
        elif norange:
            fault = "norange"
        self.record(request_line, headers, fault)
        if hold:
            await asyncio.sleep(hold["seconds"])
        if upstream[0] is None:
            upstream[0], upstream[1] = await asyncio.open_connection(*self.upstream, limit=HEAD_LIMIT)
        up_reader, up_writer = upstream

        async def to_upstream(data):
            up_writer.write(data)
            await up_writer.drain()

        await to_upstream(head)
        await copy_body(reader, to_upstream, headers, "content-length" in headers or
                        headers.get("transfer-encoding", "").lower() == "chunked")
        sink = Sink(writer, cut=cut["nbytes"] if cut else None, stall=stall)
        close = await self.forward_response(up_reader, sink, method, norange)
        return not close

    async def handle(self, reader, writer):
        self.conns += 1
        upstream = [None, None]
        try:
            while await self.one_request(reader, writer, upstream):
                pass
        except (Cut, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            # CancelledError: the proxy is shutting down with this connection open.
            pass
        finally:
            # A cut must look like a dead connection, not a polite close: abort both sides.
            writer.transport.abort()
            if upstream[1] is not None:
                upstream[1].transport.abort()

    async def control(self):
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            try:
                answer = self.stats() if line.split() == ["stats"] else self.faults.command(line)
            except ValueError:
                answer = "error: bad number"
            print(answer, flush=True)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    ap.add_argument("--log", required=True, help="file to append one line per request to")
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    with open(args.log, "a", encoding="utf-8") as log:
        proxy = Proxy((host, int(port)), log)
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.port, limit=HEAD_LIMIT)
        print("port %d" % server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await proxy.control()


if __name__ == "__main__":
    asyncio.run(main())
