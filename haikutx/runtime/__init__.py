"""
The Twisted side of the runtime: the resource that runs handlers, the handler
loader and fetcher, the worker pool and its worker protocol, the egress proxy,
and the status page.
"""
