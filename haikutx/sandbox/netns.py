# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
A network namespace per zygote whose only way out is the server's egress
proxy (SPEC 3.2).

The server makes a unix C{socketpair} and hands one end (the I{channel}) to
the zygote. The zygote calls L{enter_network_namespace} once: from then on
it and every handler it forks see only their own loopback interface. It
then opens an L{EgressRelay}: a TCP listener on C{127.0.0.1:<port>} inside
the namespace, each of whose accepted connections is passed over the
channel with C{SCM_RIGHTS} (one byte of data, C{b"C"}, per descriptor) to
the server, which runs the CONNECT proxy on it and applies the address
rules. Handlers get C{HTTP_PROXY}/C{HTTPS_PROXY}=C{http://127.0.0.1:<port>}
(L{EgressRelay.proxy_environ}).

A namespace per child would cost about 0.45 ms more per request, so it is
made once per zygote.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct

from ._libc import CLONE_NEWNET, CLONE_NEWUSER, unshare

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

#: The data byte sent with each passed descriptor.
MESSAGE = b"C"


def bring_up_loopback() -> None:
    """
    Set the C{IFF_UP} flag of C{lo} in the current network namespace.

    @raise OSError: if the ioctl fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def enter_network_namespace() -> str:
    """
    Move the calling process into a new network namespace with only a
    loopback interface, which is brought up.

    As root this is C{unshare(CLONE_NEWNET)}. Without privilege it tries a
    user namespace too (mapping the current uid and gid to themselves),
    which works where unprivileged user namespaces are enabled.

    @return: C{"net"} or C{"user+net"}, the namespaces created.
    @raise OSError: if neither is allowed.
    """
    try:
        unshare(CLONE_NEWNET)
        kind = "net"
    except PermissionError:
        uid, gid = os.geteuid(), os.getegid()
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
        kind = "user+net"
    bring_up_loopback()
    return kind


class EgressRelay:
    """
    The listener inside the namespace that hands each connection to the
    server.

    @ivar port: the TCP port on C{127.0.0.1} inside the namespace.
    """

    def __init__(self, channel: socket.socket, port: int = 0) -> None:
        """
        @param channel: this process's end of the unix socketpair to the
            server (made before the namespace was entered).
        @param port: the port to listen on, 0 for any.
        """
        self.channel = channel
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]

    def fileno(self) -> int:
        """
        The listener's descriptor, for a C{select}/C{poll} loop.
        """
        return self.listener.fileno()

    def proxy_environ(self) -> dict[str, str]:
        """
        The environment variables that point a handler at the relay.
        """
        url = f"http://127.0.0.1:{self.port}"
        return {
            "HTTP_PROXY": url,
            "HTTPS_PROXY": url,
            "http_proxy": url,
            "https_proxy": url,
            "NO_PROXY": "",
        }

    def relay_once(self) -> None:
        """
        Accept one connection and pass it to the server (blocks until one
        arrives). The descriptor is closed here once sent.

        @raise OSError: if the channel is gone.
        """
        conn, _ = self.listener.accept()
        try:
            socket.send_fds(self.channel, [MESSAGE], [conn.fileno()])
        finally:
            conn.close()

    def serve_forever(self) -> None:
        """
        Relay connections until the channel breaks or the server closes its
        end (the server never writes on the channel, so the channel turning
        readable means it is closed).  Waiting in C{accept} alone, a relay
        whose server had gone would never notice: relays of dead zygotes
        were found left over by the hundred on this machine.
        """
        import select

        poll = select.poll()
        poll.register(self.listener.fileno(), select.POLLIN)
        poll.register(self.channel.fileno(), select.POLLIN)
        while True:
            try:
                ready = {fd for fd, _ in poll.poll()}
            except InterruptedError:
                continue
            if self.channel.fileno() in ready:
                return
            try:
                self.relay_once()
            except (BrokenPipeError, ConnectionResetError):
                return
            except InterruptedError:
                continue

    def fork(self) -> int:
        """
        Run L{serve_forever} in a forked process and close the listener
        and channel here, so that no handler forked later by this process
        inherits them.

        @return: the relay process's pid (the caller reaps it).
        """
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                self.serve_forever()
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        self.close()
        return pid

    def close(self) -> None:
        """
        Close the listener and this process's end of the channel.
        """
        self.listener.close()
        self.channel.close()


def receive_connection(channel: socket.socket) -> socket.socket | None:
    """
    The server's side of the channel, for blocking use (tests, scripts): one
    connection passed by an L{EgressRelay}. (A Twisted server adopts the
    channel with C{adoptStreamConnection(fd, AF_UNIX, factory)} and gets
    the descriptors in C{fileDescriptorReceived} instead.)

    @param channel: the server's end of the socketpair.
    @return: the connected socket, or C{None} when the relay is gone.
    """
    data, fds, _, _ = socket.recv_fds(channel, len(MESSAGE), 1)
    if not fds:
        return None
    return socket.socket(fileno=fds[0])
