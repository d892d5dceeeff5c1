"""
What reading one request and its response costs a forwarder: haikutx's own
strict parser (L{haikutx.net.http1}) against h11, per exchange, in CPU time
(time.process_time, so a shared machine skews it less).

    PYTHONPATH=. python bench/http1_bench.py [exchanges]

A forwarder needs, per exchange: the request head parsed and its body
framing known, and the response head parsed and its body's end found. With
h11 that means two state machines (one per side) that must each see the
exchange complete before the next cycle.
"""

import sys
import time

import h11

from haikutx.net.http1 import BodyFramer, head_end, parse_request_head, parse_response_head

REQUEST = (
    b"GET /8080/some/path?x=1 HTTP/1.1\r\n"
    b"Host: gate.example\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=0123456789abcdef; theme=dark\r\n"
    b"\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Date: Tue, 01 Dec 2026 19:00:00 GMT\r\n"
    b"Server: TwistedWeb/24.11.0\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
    b"hello"
)


def own(n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        end = head_end(REQUEST)
        request = parse_request_head(REQUEST[:end])
        BodyFramer.for_request(request).consume(REQUEST, end)
        end = head_end(RESPONSE)
        response = parse_response_head(RESPONSE[:end])
        framer = BodyFramer.for_response(response, request.method)
        framer.consume(RESPONSE, end)
        assert framer.done
    return (time.process_time() - start) / n


def with_h11(n: int) -> float:
    server = h11.Connection(h11.SERVER)
    client = h11.Connection(h11.CLIENT)
    start = time.process_time()
    for _ in range(n):
        server.receive_data(REQUEST)
        request = server.next_event()
        assert server.next_event() == h11.EndOfMessage()
        client.send(request)
        client.send(h11.EndOfMessage())
        client.receive_data(RESPONSE)
        response = client.next_event()
        client.next_event()
        client.next_event()
        server.send(response)
        server.send(h11.Data(data=b"hello"))
        server.send(h11.EndOfMessage())
        client.start_next_cycle()
        server.start_next_cycle()
    return (time.process_time() - start) / n


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    a = min(own(n) for _ in range(3))
    b = min(with_h11(n) for _ in range(3))
    print(f"per exchange: haikutx.net.http1 {a * 1e6:.1f} us, h11 {b * 1e6:.1f} us "
          f"({b / a:.1f}x)")
