"""
The gate's own CPU cost per kept-alive exchange, without sockets: one
request fed to a L{GateProtocol} (on a L{StringTransport}) and routed to a
kept application connection, and its response fed back, in CPU time.

    PYTHONPATH=. python bench/gate_exchange_bench.py [profile]

With an argument, also prints a cProfile of the exchanges. It measures
the same request and response heads every time (a connection remembers the
last head it parsed, so they are not parsed again: a client that repeats
its request, an application's answers within one second of Date) and heads
that differ every time (a changing query and Date: parsed every time).
"""

import cProfile
import pstats
import sys
import time

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from haikutx.gate.backends import BackendProtocol
from haikutx.gate.service import GateService

REQUEST = b"GET /18181/ HTTP/1.1\r\nHost: 127.0.0.1:18180\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: TwistedWeb/26.10.0\r\n"
    b"Date: Tue, 01 Dec 2026 19:00:00 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)

gate = GateService(Clock(), install_sighup=False)
client = gate.factory.buildProtocol(None)
client_transport = StringTransport(
    peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
    hostAddress=IPv4Address("TCP", "127.0.0.1", 18180),
)
client.makeConnection(client_transport)
backend_transport = StringTransport()
backend = BackendProtocol(gate.factory.pool, 18181, lambda b: None)
backend.makeConnection(backend_transport)
gate.factory.pool.give(backend)


#: Requests and responses whose heads differ every time (a query, Date).
VARIED = [
    (REQUEST.replace(b"/ HTTP", b"/?%d HTTP" % i), RESPONSE.replace(b"19:00:00", b"19:00:%02d" % i))
    for i in range(2)
]


def exchange(request: bytes = REQUEST, response: bytes = RESPONSE) -> None:
    client.dataReceived(request)
    backend.dataReceived(response)
    client_transport.clear()
    backend_transport.clear()


def run(n: int, varied: bool = False) -> float:
    start = time.process_time()
    if varied:
        for i in range(n):
            exchange(*VARIED[i & 1])
    else:
        for _ in range(n):
            exchange()
    return (time.process_time() - start) / n


if __name__ == "__main__":
    run(1000)
    assert client.state.name == "HEAD", client.state
    print(f"{min(run(20000) for _ in range(3)) * 1e6:.1f} us per exchange (same heads)")
    print(f"{min(run(20000, True) for _ in range(3)) * 1e6:.1f} us per exchange (heads differ)")
    if len(sys.argv) > 1:
        cProfile.run("run(20000)", "/tmp/gate_exchange.prof")
        pstats.Stats("/tmp/gate_exchange.prof").sort_stats("tottime").print_stats(20)
