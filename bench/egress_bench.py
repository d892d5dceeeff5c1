"""
Egress proxy benchmark: CONNECT tunnels opened per second (each one: connect,
CONNECT, 200, one 64-byte round trip through the tunnel, close) and the
throughput of one tunnel, against an echo server on 127.0.0.1.

The proxy and the echo server run in a child process (one Twisted reactor);
this process is the client, with blocking sockets. Bounded by --seconds.

    .venv/bin/python bench/egress_bench.py --seconds 3 --megabytes 64
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

SERVER = """
import sys
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from haikutx.net.addresses import EgressRules
from haikutx.runtime.egress import EgressProxyFactory

class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

echo = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
port = echo.getHost().port
rules = EgressRules.from_pairs([f"127.0.0.1:{port}"])
proxy = reactor.listenTCP(0, EgressProxyFactory(reactor, rules), interface="127.0.0.1")
print(port, proxy.getHost().port, flush=True)
reactor.run()
"""


def tunnel(proxy: int, target: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy), timeout=10)
    s.sendall(f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = s.recv(1)
        if not chunk:
            raise RuntimeError(f"proxy closed: {head!r}")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head)
    return s


def recv_exactly(s: socket.socket, n: int) -> None:
    while n:
        chunk = s.recv(min(n, 1 << 20))
        if not chunk:
            raise RuntimeError("closed early")
        n -= len(chunk)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--megabytes", type=int, default=64)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
    )
    try:
        assert server.stdout is not None
        target, proxy = map(int, server.stdout.readline().split())
        payload = b"x" * 64
        count = 0
        end = time.monotonic() + args.seconds
        start = time.monotonic()
        while time.monotonic() < end:
            with tunnel(proxy, target) as s:
                s.sendall(payload)
                recv_exactly(s, len(payload))
            count += 1
        elapsed = time.monotonic() - start
        print(f"tunnels: {count / elapsed:.0f}/s ({count} in {elapsed:.1f}s)")

        total = args.megabytes << 20
        block = b"y" * (1 << 16)
        with tunnel(proxy, target) as s:
            start = time.monotonic()

            def send() -> None:
                sent = 0
                while sent < total:
                    s.sendall(block)
                    sent += len(block)

            sender = threading.Thread(target=send)
            sender.start()
            recv_exactly(s, total)
            sender.join()
            elapsed = time.monotonic() - start
        print(
            f"throughput: {args.megabytes / elapsed:.0f} MiB/s echoed "
            f"({args.megabytes} MiB each way in {elapsed:.2f}s)"
        )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
