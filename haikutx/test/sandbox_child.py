# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
A hostile handler process for L{haikutx.test.test_sandbox}.

Run as C{python -m haikutx.test.sandbox_child "<repr of a dict>"}. This
process plays the zygote: it prepares the sandbox (and, if asked, enters a
network namespace with an egress relay), then forks a child that applies
the sandbox and runs one attack, writing a JSON report on stdout. The
zygote prints that report with the child's exit status. Only the standard
library and L{haikutx.sandbox} are imported (no Twisted), like a real
zygote.
"""

import ast
import ctypes
import os
import signal
import sys
import time

from haikutx.sandbox import (
    EgressRelay,
    Identity,
    ResourceLimits,
    SandboxPolicy,
    enter_network_namespace,
    prepare,
)

#: Modules dropped from C{sys.modules} after preparing, so that the child
#: must read them from disk again under the sandbox.
_PURGE = ("json", "asyncio", "ssl", "socket", "selectors", "concurrent", "base64")


def _result(ok, **extra):
    extra["ok"] = ok
    return extra


def _error(e):
    return _result(False, errno=getattr(e, "errno", None), error=f"{type(e).__name__}: {e}")


def attack(name, args):
    """
    Try one thing a handler must not be able to do (or must be able to
    do, for C{imports} and C{threads}).

    @return: a dict with C{ok} (did it work) and details.
    """
    if name == "read":
        try:
            with open(args["path"], "rb") as f:
                return _result(True, data=f.read(64).decode("latin-1"))
        except OSError as e:
            return _error(e)
    if name == "listdir":
        try:
            return _result(True, names=os.listdir(args["path"]))
        except OSError as e:
            return _error(e)
    if name == "write":
        try:
            with open(args["path"], "w") as f:
                f.write("x")
            return _result(True)
        except OSError as e:
            return _error(e)
    if name == "listen":
        import socket

        try:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen()
            return _result(True, port=s.getsockname()[1])
        except OSError as e:
            return _error(e)
    if name == "fork":
        try:
            pid = os.fork()
        except OSError as e:
            return _error(e)
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return _result(True)
    if name == "subprocess":
        import subprocess

        try:
            out = subprocess.run(["sh", "-c", "echo pwned"], capture_output=True, timeout=5)
            return _result(True, out=out.stdout.decode())
        except OSError as e:
            return _error(e)
    if name == "execv":
        try:
            os.execv("/bin/sh", ["sh", "-c", 'echo \'{"ok": true}\''])
        except OSError as e:
            return _error(e)
    if name == "kill":
        pid = os.getppid() if args["pid"] == "parent" else args["pid"]
        try:
            os.kill(pid, signal.SIGKILL)
            return _result(True, pid=pid)
        except OSError as e:
            return _error(e)
    if name == "ptrace":
        libc = ctypes.CDLL(None, use_errno=True)
        PTRACE_ATTACH = 16
        r = libc.ptrace(PTRACE_ATTACH, os.getppid(), None, None)
        if r == 0:
            return _result(True)
        e = ctypes.get_errno()
        return _result(False, errno=e, error=os.strerror(e))
    if name == "memory":
        try:
            block = bytearray(4 << 30)
            return _result(True, size=len(block))
        except MemoryError as e:
            return _result(False, error=f"MemoryError: {e}")
    if name == "threads":
        import threading

        done = []
        workers = [threading.Thread(target=lambda i=i: done.append(i * i)) for i in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        stop = threading.Event()
        started = 0
        error = None
        for _ in range(args.get("many", 5000)):
            try:
                threading.Thread(target=stop.wait, daemon=True).start()
                started += 1
            except RuntimeError as e:
                error = str(e)
                break
        stop.set()
        return _result(len(done) == 8, few=len(done), many=started, error=error)
    if name == "unix_connect":
        import socket

        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            return _error(e)
        try:
            s.connect(args["path"])
            return _result(True)
        except OSError as e:
            return _error(e)
    if name == "unix_dgram_pair":
        import socket

        try:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            a.connect(args["path"])
            return _result(True)
        except OSError as e:
            return _error(e)
    if name == "netlink":
        import socket

        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
            return _result(True)
        except OSError as e:
            return _error(e)
    if name == "tcp_connect":
        import socket

        try:
            s = socket.create_connection(("127.0.0.1", args["port"]), timeout=3)
            s.sendall(b"ping")
            return _result(True, reply=s.recv(16).decode())
        except OSError as e:
            return _error(e)
    if name == "imports":
        preloaded = [m for m in ("json", "asyncio", "ssl") if m in sys.modules]
        import asyncio
        import json  # noqa: F401
        import socket  # noqa: F401
        import ssl

        context = ssl.create_default_context()
        cas = context.cert_store_stats()["x509_ca"]

        async def main():
            reader, writer = await asyncio.open_connection(sock=socket.socketpair()[0])
            await asyncio.sleep(0.01)
            writer.close()
            return "loop ran"

        return _result(
            True,
            loop=asyncio.run(main()),
            cas=cas,
            preloaded=preloaded,
            uid=os.getuid(),
            gid=os.getgid(),
            groups=os.getgroups(),
            status=_status(),
        )
    if name == "exec_script":
        try:
            os.execv(args["argv"][0], args["argv"])
        except OSError as e:
            return _error(e)
    if name == "fstat":
        try:
            os.fstat(args["fd"])
            return _result(True)
        except OSError as e:
            return _error(e)
    if name == "cpu":
        while True:
            pass
    raise ValueError(name)


def _status():
    from haikutx.sandbox._libc import PR_GET_NO_NEW_PRIVS, PR_GET_SECCOMP, prctl
    from haikutx.sandbox.privileges import get_capabilities

    effective, permitted, inheritable = get_capabilities()
    return {
        "effective": effective,
        "permitted": permitted,
        "inheritable": inheritable,
        "no_new_privs": prctl(PR_GET_NO_NEW_PRIVS),
        "seccomp": prctl(PR_GET_SECCOMP),
    }


def main(config):
    limits = ResourceLimits(
        address_space=config.get("memory", 256 << 20), cpu_seconds=config.get("cpu", 5)
    )
    identity = None
    if config.get("uid") is not None:
        identity = Identity(
            config["uid"], config["uid"], keep_read_capability=config.get("keep_cap", True)
        )
    connect_ports = None
    channel_fd = config.get("channel_fd")
    relay_pid = None
    if config.get("netns"):
        enter_network_namespace()
        if channel_fd is not None:
            import socket

            relay = EgressRelay(socket.socket(fileno=channel_fd))
            connect_ports = (relay.port,)
            config["args"]["port"] = config.get("other_port", relay.port)
            relay_pid = relay.fork()
    policy = SandboxPolicy(
        limits=limits,
        identity=identity,
        allow_exec=config.get("allow_exec", False),
        exec_paths=tuple(config.get("exec_paths", ())),
        connect_ports=connect_ports,
        max_threads=config.get("max_threads"),
    )
    sandbox = prepare(policy)
    for name in list(sys.modules):
        if name.split(".")[0] in _PURGE:
            del sys.modules[name]
    if config.get("leak"):
        config["args"]["fd"] = os.open("/etc/hostname", os.O_RDONLY)
    r, w = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(w, 1)
            sandbox.apply(keep_fds=(0, 1, 2), parent_death_signal=signal.SIGKILL)
            report = attack(config["attack"], config["args"])
        except BaseException as e:  # report, never hide
            report = {"ok": None, "crash": f"{type(e).__name__}: {e}"}
        import json

        os.write(1, json.dumps(report).encode())
        os._exit(0)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + config.get("timeout", 20)
    os.set_blocking(r, False)
    status = None
    while time.monotonic() < deadline:
        try:
            chunk = os.read(r, 65536)
            if chunk:
                chunks.append(chunk)
                continue
        except BlockingIOError:
            pass
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        time.sleep(0.005)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    try:
        chunks.append(os.read(r, 65536))
    except BlockingIOError:
        pass
    elapsed = time.perf_counter() - started
    if relay_pid is not None:
        os.kill(relay_pid, signal.SIGKILL)
        os.waitpid(relay_pid, 0)
    out = b"".join(chunks).decode("utf-8", "replace")
    signum = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
    sys.stdout.write(
        repr(
            {
                "output": out,
                "signal": signum,
                "exit": code,
                "timed_out": status is None,
                "elapsed": elapsed,
                "layers": sandbox.layers,
                "zygote_alive": True,
            }
        )
    )


if __name__ == "__main__":
    main(ast.literal_eval(sys.argv[1]))
