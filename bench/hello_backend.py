"""
A Twisted hello backend for bench/gate_bench.sh: answers every request
with C{hello} on [::] (dual stack, since httpGate connects to [::1]).

    python bench/hello_backend.py PORT
"""

import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"hello"


if __name__ == "__main__":
    site = Site(Hello())
    site.log = lambda request: None
    reactor.listenTCP(int(sys.argv[1]), site, interface="::")
    reactor.run()
