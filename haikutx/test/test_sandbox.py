"""
Tests for L{haikutx.sandbox}: each guarantee of SPEC 3.2 that the kernel
enforces is tried for real by a hostile child process
(L{haikutx.test.sandbox_child}) that prepares the sandbox as a zygote would,
forks, applies it, and attacks.

These tests start plain processes with L{subprocess} (bounded by timeouts)
and use no reactor: the sandbox package is Twisted-free by design.
"""

from __future__ import annotations

import ast
import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haikutx.sandbox import (
    Identity,
    SandboxError,
    SandboxPolicy,
    identity_for,
    interpreter_read_paths,
    probe,
    receive_connection,
    seccomp,
)
from haikutx.sandbox.policy import elf_interpreter

LAYERS = probe()
ROOT = os.geteuid() == 0
#: A uid no account uses, for the uid-switch tests.
TEST_UID = 64001


def _needs(condition: bool, reason: str):
    def decorate(f):
        if not condition:
            f.skip = reason
        return f

    return decorate


needs_landlock = _needs(LAYERS.landlock_abi >= 1, LAYERS.reasons.get("landlock", ""))
needs_seccomp = _needs(LAYERS.seccomp, LAYERS.reasons.get("seccomp", ""))
needs_root = _needs(ROOT, "needs root: the uid switch is only made when started as root")
needs_netns = _needs(
    LAYERS.network_namespaces, LAYERS.reasons.get("network_namespaces", "")
)
needs_scopes = _needs(LAYERS.landlock_scopes, LAYERS.reasons.get("landlock_scopes", ""))


def run_child(
    test, attack: str, args: dict | None = None, pass_fds=(), prefix=(), **config
):
    """
    Run one hostile child and return the zygote's report, with the child's
    JSON report parsed into C{report} when it wrote one.
    """
    config = dict(config, attack=attack, args=args or {})
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "haikutx.test.sandbox_child", repr(config)],
        capture_output=True,
        timeout=60,
        pass_fds=pass_fds,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    test.assertEqual(proc.returncode, 0, proc.stderr.decode())
    result = ast.literal_eval(proc.stdout.decode())
    result["stderr"] = proc.stderr.decode()
    try:
        result["report"] = json.loads(result["output"])
    except ValueError:
        result["report"] = None
    return result


class HostileChildTests(SynchronousTestCase):
    """
    A sandboxed child cannot do what SPEC 3.2 forbids, and can still do
    what a handler needs.
    """

    def denied(self, result, errnos=(errno.EPERM, errno.EACCES)):
        report = result["report"]
        self.assertIsNotNone(report, result)
        self.assertIs(report["ok"], False, report)
        if errnos is not None:
            self.assertIn(report.get("errno"), errnos, report)
        return report

    @needs_landlock
    def test_read_shadow(self):
        """
        A sandboxed child cannot read C{/etc/shadow}.
        """
        self.denied(run_child(self, "read", {"path": "/etc/shadow"}), (errno.EACCES,))

    @needs_landlock
    def test_read_secret(self):
        """
        A sandboxed child cannot read a file the server can read (standing
        for the TLS key or the job database), though the same read works
        without the sandbox.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "key.pem")
        with open(path, "w") as f:
            f.write("SECRET")
        self.addCleanup(os.remove, path)
        with open(path) as f:
            self.assertEqual(f.read(), "SECRET")
        self.denied(run_child(self, "read", {"path": path}), (errno.EACCES,))

    @needs_landlock
    def test_write_tmp(self):
        """
        A sandboxed child cannot create a file in C{/tmp}.
        """
        path = os.path.join(tempfile.gettempdir(), f"haikutx-x-{os.getpid()}")
        self.addCleanup(lambda: os.path.exists(path) and os.remove(path))
        self.denied(run_child(self, "write", {"path": path}))
        self.assertFalse(os.path.exists(path))

    @needs_seccomp
    def test_listen(self):
        """
        A sandboxed child cannot bind and listen on a port.
        """
        self.denied(run_child(self, "listen"))

    @needs_seccomp
    def test_fork(self):
        """
        A sandboxed child cannot C{os.fork}.
        """
        self.denied(run_child(self, "fork"))

    @needs_seccomp
    def test_subprocess(self):
        """
        A sandboxed child cannot start C{sh} with L{subprocess}.
        """
        self.denied(run_child(self, "subprocess"))

    @needs_seccomp
    def test_execv(self):
        """
        A sandboxed Python child cannot C{os.execv}.
        """
        self.denied(run_child(self, "execv"))

    @needs_scopes
    def test_kill_parent(self):
        """
        A sandboxed child cannot signal its parent (the zygote), even with
        the same uid: Landlock scopes signals to its domain.
        """
        result = run_child(self, "kill", {"pid": "parent"})
        self.denied(result)

    @needs_scopes
    def test_kill_other(self):
        """
        A sandboxed child cannot kill another process (standing for a
        sibling worker), which stays alive.
        """
        other = subprocess.Popen(["sleep", "30"])
        self.addCleanup(other.wait)
        self.addCleanup(other.kill)
        self.denied(run_child(self, "kill", {"pid": other.pid}))
        self.assertIsNone(other.poll())

    @needs_seccomp
    def test_ptrace(self):
        """
        A sandboxed child cannot C{ptrace} its parent.
        """
        self.denied(run_child(self, "ptrace"))

    def test_memory(self):
        """
        A sandboxed child cannot allocate 4 GiB: C{RLIMIT_AS} makes the
        allocation fail with L{MemoryError}.
        """
        report = self.denied(run_child(self, "memory"), None)
        self.assertIn("MemoryError", report["error"])

    def test_cpu(self):
        """
        A sandboxed child that spins is killed by C{RLIMIT_CPU} (C{SIGXCPU}).
        """
        result = run_child(self, "cpu", cpu=1)
        self.assertIn(result["signal"], (24, 9), result)
        self.assertFalse(result["timed_out"])

    def test_threads(self):
        """
        A sandboxed child can start threads, but not without bound.
        """
        report = run_child(self, "threads", {"many": 5000})["report"]
        self.assertEqual(report["few"], 8, report)
        self.assertTrue(report["ok"])
        self.assertGreater(report["many"], 10)
        self.assertLess(report["many"], 5000)

    @needs_seccomp
    def test_unix_connect(self):
        """
        A sandboxed child cannot connect to a unix socket path where a
        server listens: it cannot create an C{AF_UNIX} socket.
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "s")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen()
        os.chmod(directory, 0o755)
        os.chmod(path, 0o777)
        self.addCleanup(os.rmdir, directory)
        self.addCleanup(os.remove, path)
        self.addCleanup(server.close)
        self.denied(run_child(self, "unix_connect", {"path": path}))

    @needs_seccomp
    def test_unix_datagram_pair(self):
        """
        A sandboxed child cannot make a datagram socketpair (which could be
        re-connected to a path); stream pairs, which asyncio uses, work
        (see L{test_imports}).
        """
        self.denied(run_child(self, "unix_dgram_pair", {"path": "/dev/log"}))

    @needs_seccomp
    def test_netlink(self):
        """
        A sandboxed child cannot open a netlink socket.
        """
        self.denied(run_child(self, "netlink"))

    @needs_landlock
    def test_imports(self):
        """
        A sandboxed child imports json, asyncio, ssl and socket from disk,
        loads the system's CA certificates and runs an asyncio loop over a
        socketpair; no_new_privs and a seccomp filter are in force.
        """
        report = run_child(self, "imports")["report"]
        self.assertTrue(report["ok"], report)
        self.assertEqual(report["preloaded"], [])
        self.assertEqual(report["loop"], "loop ran")
        self.assertGreater(report["cas"], 0)
        self.assertEqual(report["status"]["no_new_privs"], 1)
        self.assertEqual(report["status"]["seccomp"], 2)


    def test_inherited_fd_closed(self):
        """
        A descriptor the zygote had open (standing for the relay's listener
        or a control socket) is closed in the child.
        """
        self.denied(run_child(self, "fstat", leak=True), (errno.EBADF,))

    def test_no_twisted_in_zygote(self):
        """
        Importing and preparing the sandbox pulls in neither Twisted nor
        attrs (the zygote must stay lean).
        """
        code = (
            "import sys; from haikutx.sandbox import prepare, probe, SandboxPolicy; "
            "probe(); prepare(SandboxPolicy()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('twisted', 'attrs', 'attr', 'zope')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=60, check=True,
            cwd=_ROOT,
        )
        self.assertEqual(out.stdout.strip(), b"[]")


class NonRootZygoteTests(SynchronousTestCase):
    """
    A zygote that is not root (here: root dropped to uid 64002 by
    C{setpriv}, keeping only C{CAP_DAC_READ_SEARCH} to read the
    interpreter) still confines its children with Landlock, seccomp and
    rlimits.
    """

    def setpriv(self):
        if not ROOT:
            raise self.skipTest("already not root: the other tests cover this case")
        path = "/usr/bin/setpriv"
        if not os.path.exists(path):
            raise self.skipTest("setpriv (util-linux) is not installed")
        return (
            path, "--reuid", "64002", "--regid", "64002", "--clear-groups",
            "--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search",
        )

    @needs_landlock
    def test_imports(self):
        """
        The non-root child imports the standard library and runs a loop.
        """
        result = run_child(self, "imports", prefix=self.setpriv())
        self.assertEqual(result["layers"]["uid"], "not root: handlers run as this process's uid")
        self.assertTrue(result["report"]["ok"], result)
        self.assertEqual(result["report"]["uid"], 64002)

    @needs_landlock
    def test_read_shadow(self):
        """
        The non-root child cannot read C{/etc/shadow}, capability or not.
        """
        result = run_child(self, "read", {"path": "/etc/shadow"}, prefix=self.setpriv())
        self.assertEqual(result["report"]["errno"], errno.EACCES, result)

    @needs_scopes
    def test_kill_parent(self):
        """
        The non-root child cannot signal its zygote, which has the same uid.
        """
        result = run_child(self, "kill", {"pid": "parent"}, prefix=self.setpriv())
        self.assertEqual(result["report"]["errno"], errno.EPERM, result)

    @needs_seccomp
    def test_fork(self):
        """
        The non-root child cannot fork.
        """
        result = run_child(self, "fork", prefix=self.setpriv())
        self.assertEqual(result["report"]["errno"], errno.EPERM, result)


class IdentityTests(SynchronousTestCase):
    """
    Started as root, a sandboxed child runs as an unprivileged uid that
    keeps only C{CAP_DAC_READ_SEARCH}, confined by Landlock.
    """

    @needs_root
    @needs_landlock
    def test_imports_as_other_uid(self):
        """
        A child switched to an unprivileged uid still imports the standard
        library from an interpreter its uid may not enter, with only
        C{CAP_DAC_READ_SEARCH} left and no supplementary groups.
        """
        report = run_child(self, "imports", uid=TEST_UID)["report"]
        self.assertTrue(report["ok"], report)
        self.assertEqual((report["uid"], report["gid"], report["groups"]), (TEST_UID, TEST_UID, []))
        self.assertEqual(report["status"]["effective"], 1 << 2)
        self.assertEqual(report["status"]["permitted"], 1 << 2)

    @needs_root
    @needs_landlock
    def test_capability_needed(self):
        """
        Without the kept capability, a child whose interpreter lives where
        its uid cannot enter fails to import: the test above proves the
        capability, not root, makes it work.
        """
        prefix = os.path.realpath(sys.base_prefix)
        blocked = any(not os.stat(p).st_mode & 0o001 for p in _parents(prefix))
        if not blocked:
            raise self.skipTest("the interpreter is readable by every uid here")
        result = run_child(self, "imports", uid=TEST_UID, keep_cap=False)
        self.assertFalse(result["report"] and result["report"].get("ok"), result)

    @needs_root
    @needs_landlock
    def test_read_shadow_with_capability(self):
        """
        C{CAP_DAC_READ_SEARCH} does not let the child read C{/etc/shadow}:
        Landlock denies it.
        """
        result = run_child(self, "read", {"path": "/etc/shadow"}, uid=TEST_UID)
        self.assertEqual(result["report"]["errno"], errno.EACCES, result)

    @needs_root
    @needs_landlock
    def test_private_keys_with_capability(self):
        """
        C{CAP_DAC_READ_SEARCH} does not let the child list
        C{/etc/ssl/private} (which holds TLS keys) although C{/etc/ssl/certs}
        is readable.
        """
        if not os.path.isdir("/etc/ssl/private"):
            raise self.skipTest("no /etc/ssl/private here")
        result = run_child(self, "listdir", {"path": "/etc/ssl/private"}, uid=TEST_UID)
        self.assertEqual(result["report"]["errno"], errno.EACCES, result)
        result = run_child(self, "listdir", {"path": "/etc/ssl/certs"}, uid=TEST_UID)
        self.assertTrue(result["report"]["ok"], result)

    @needs_root
    @needs_landlock
    def test_threads_bounded_by_nproc(self):
        """
        With a uid of its own, the child's tasks are bounded by
        C{RLIMIT_NPROC} (C{max_threads}).
        """
        report = run_child(self, "threads", {"many": 5000}, uid=TEST_UID, max_threads=20)[
            "report"
        ]
        self.assertEqual(report["few"], 8)
        self.assertLess(report["many"], 20)

    @needs_root
    @needs_scopes
    def test_kill_parent_as_other_uid(self):
        """
        A child with another uid cannot signal its root parent.
        """
        report = run_child(self, "kill", {"pid": "parent"}, uid=TEST_UID)["report"]
        self.assertEqual(report["errno"], errno.EPERM, report)

    @needs_root
    @needs_landlock
    def test_exec_policy(self):
        """
        Under the exec policy (stdio interpreters) the child may exec only
        the allowed interpreter, which cannot read C{/etc/shadow}, write a
        file, or exec anything else.
        """
        sh = os.path.realpath("/bin/sh")
        script = (
            "echo start; read x < /etc/shadow && echo shadow || echo noshadow; "
            "{ echo > /tmp/x-haikutx; } 2>/dev/null && echo wrote || echo nowrite; "
            "exec /usr/bin/env"
        )
        result = run_child(
            self,
            "exec_script",
            {"argv": [sh, "-c", script]},
            uid=TEST_UID,
            allow_exec=True,
            exec_paths=[sh],
        )
        self.assertEqual(result["output"], "start\nnoshadow\nnowrite\n", result)
        self.assertEqual(result["exit"], 126)

    @needs_root
    @needs_seccomp
    def test_exec_policy_no_fork(self):
        """
        Under the exec policy the interpreter still cannot start a process.
        """
        sh = os.path.realpath("/bin/sh")
        result = run_child(
            self,
            "exec_script",
            {"argv": [sh, "-c", "/bin/true; echo after"]},
            uid=TEST_UID,
            allow_exec=True,
            exec_paths=[sh],
        )
        self.assertNotIn("after", result["output"])
        self.assertNotEqual(result["exit"], 0)

    @needs_root
    @needs_landlock
    def test_exec_python_as_other_uid(self):
        """
        Under the exec policy an interpreter under a directory the uid
        cannot enter runs (the capability is ambient, so it survives exec).
        """
        python = os.path.realpath(sys.executable)
        result = run_child(
            self,
            "exec_script",
            {
                "argv": [
                    python, "-c",
                    "import ssl, os; ssl.create_default_context(); print(os.getuid())",
                ]
            },
            uid=TEST_UID,
            allow_exec=True,
            exec_paths=[python],
        )
        self.assertEqual(result["output"], f"{TEST_UID}\n", result)


def _parents(path):
    while path != "/":
        yield path
        path = os.path.dirname(path)


class NetworkNamespaceTests(SynchronousTestCase):
    """
    In the zygote's network namespace a child reaches nothing on this
    machine but the egress relay, whose connections are passed to the
    server.
    """

    @needs_netns
    def test_loopback_refused(self):
        """
        A child cannot connect to a port where this test listens on
        127.0.0.1, though this process can.
        """
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        self.addCleanup(server.close)
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        report = run_child(self, "tcp_connect", {"port": port}, netns=True)["report"]
        self.assertIs(report["ok"], False, report)
        self.assertEqual(report["errno"], errno.ECONNREFUSED)

    @needs_netns
    @needs_landlock
    def test_egress_relay(self):
        """
        A child's connection to the relay port arrives at the server as a
        passed descriptor on which both sides talk.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        ours.settimeout(20)
        proc = subprocess.Popen(
            cwd=_ROOT,
            args=[
                sys.executable,
                "-m",
                "haikutx.test.sandbox_child",
                repr(
                    {
                        "attack": "tcp_connect",
                        "args": {},
                        "netns": True,
                        "channel_fd": theirs.fileno(),
                    }
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        conn = receive_connection(ours)
        self.assertIsNotNone(conn)
        with conn:
            conn.settimeout(10)
            self.assertEqual(conn.recv(4), b"ping")
            conn.sendall(b"pong")
        out, err = proc.communicate(timeout=30)
        report = json.loads(ast.literal_eval(out.decode())["output"])
        self.assertEqual(report, {"ok": True, "reply": "pong"}, err)

    @needs_netns
    @needs_landlock
    def test_other_port_in_namespace(self):
        """
        With the relay's port as the only allowed one, connecting to any
        other port is denied by Landlock.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        proc = subprocess.run(
            cwd=_ROOT,
            args=[
                sys.executable,
                "-m",
                "haikutx.test.sandbox_child",
                repr(
                    {
                        "attack": "tcp_connect",
                        "args": {},
                        "netns": True,
                        "channel_fd": theirs.fileno(),
                        "other_port": 1,
                    }
                ),
            ],
            capture_output=True,
            timeout=60,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        report = json.loads(ast.literal_eval(proc.stdout.decode())["output"])
        self.assertIs(report["ok"], False, report)
        self.assertEqual(report["errno"], errno.EACCES)


class PrepareTests(SynchronousTestCase):
    """
    L{prepare}'s inputs: the read paths, the identity, the filter.
    """

    def test_read_paths(self):
        """
        The interpreter's read paths hold its prefix, the haikutx package
        and the CA store, and not the current directory or C{/etc} itself.
        """
        paths = interpreter_read_paths()
        self.assertIn(os.path.realpath(sys.base_prefix), paths)
        import haikutx

        self.assertIn(os.path.dirname(os.path.abspath(haikutx.__file__)), paths)
        self.assertIn("/etc/ssl/certs", paths)
        for path in paths:
            real = os.path.realpath(path)
            for secret in ("/etc/ssl/private", "/etc/shadow", "/root"):
                self.assertFalse(
                    (secret + "/").startswith(real.rstrip("/") + "/")
                    and not real.startswith("/root/"),
                    f"{path} grants {secret}",
                )
        self.assertNotIn(os.getcwd(), paths)
        self.assertNotIn("/usr", paths)

    def test_identity_for_slot(self):
        """
        As root, a base uid gives each slot its own uid and gid; a user
        name gives that user's ids; root itself is refused.
        """
        if not ROOT:
            self.assertIsNone(identity_for("nobody", 3))
            return
        self.assertEqual(identity_for(None, 3, base_uid=60000), Identity(60003, 60003))
        nobody = identity_for("nobody")
        self.assertGreater(nobody.uid, 0)
        self.assertRaises(SandboxError, identity_for, "root")
        self.assertRaises(SandboxError, identity_for, "no-such-user-haikutx")

    def test_syscall_tables(self):
        """
        The filter's system call numbers are libseccomp's.
        """
        try:
            lib = ctypes.CDLL("libseccomp.so.2")
        except OSError:
            raise self.skipTest("libseccomp.so.2 is not installed") from None
        resolve = lib.seccomp_syscall_resolve_name_arch
        resolve.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
        for machine, table in seccomp.SYSCALLS.items():
            for name, number in table.items():
                self.assertEqual(
                    resolve(seccomp.AUDIT_ARCH[machine], name.encode()),
                    number,
                    f"{machine} {name}",
                )

    def test_exec_filter_differs(self):
        """
        The exec policy's filter lacks the two exec denials.
        """
        strict = seccomp.build_program("x86_64", allow_exec=False)
        loose = seccomp.build_program("x86_64", allow_exec=True)
        self.assertEqual(len(strict) - len(loose), 2)

    def test_elf_interpreter(self):
        """
        The dynamic loader of an ELF executable is found; a script has none.
        """
        loader = elf_interpreter(os.path.realpath(sys.executable))
        self.assertTrue(loader is None or os.path.exists(loader))
        self.assertIsNone(elf_interpreter(__file__))

    def test_probe_reasons(self):
        """
        Every missing layer comes with a reason.
        """
        layers = probe()
        if layers.landlock_abi < 1:
            self.assertIn("landlock", layers.reasons)
        if not layers.seccomp:
            self.assertIn("seccomp", layers.reasons)
        if not layers.network_namespaces:
            self.assertIn("network_namespaces", layers.reasons)
        json.dumps(layers.as_dict())

    def test_policy_default_no_exec(self):
        """
        The default policy forbids exec.
        """
        self.assertFalse(SandboxPolicy().allow_exec)


#: The source tree's root (so that C{python -m haikutx...} finds the package).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_bpf(program, nr: int, arch: int, args: tuple[int, ...]) -> int:
    """
    Interpret the classic BPF subset the filter uses over a
    C{seccomp_data}.
    """
    data = {0: nr, 4: arch}
    for i, value in enumerate(args):
        data[16 + 8 * i] = value & 0xFFFFFFFF
        data[20 + 8 * i] = value >> 32
    acc = 0
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            acc = data[k]
        elif code == 0x54:
            acc &= k
        elif code == 0x06:
            return k
        elif code in (0x15, 0x35, 0x45):
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        else:
            raise AssertionError(f"unknown opcode {code:#x}")
        pc += 1


def _expected(
    machine: str, allow_exec: bool, nr: int, args: tuple[int, ...],
    allow_fork: bool = False, allow_ipc_namespace: bool = False, deny_ipc: bool = True,
) -> int:
    """
    The decision the filter should make, written plainly.
    """
    table = seccomp.SYSCALLS[machine]
    names = {v: n for n, v in table.items()}
    name = names.get(nr)
    eperm = seccomp.RET_ERRNO | errno.EPERM
    if machine == "x86_64" and nr >= 0x40000000:
        return seccomp.RET_KILL_PROCESS
    low = [a & 0xFFFFFFFF for a in args]
    if name == "unshare" and allow_ipc_namespace:
        return seccomp.RET_ALLOW if low[0] == seccomp.CLONE_NEWIPC else eperm
    ipc = deny_ipc and name in seccomp.IPC
    if name in seccomp.DENIED or ipc or (name in seccomp.EXEC and not allow_exec):
        return eperm
    if name in seccomp.FORK and not allow_fork:
        return eperm
    if name == "clone3":
        return seccomp.RET_ERRNO | errno.ENOSYS
    if name == "clone":
        if low[0] & seccomp.CLONE_NEW_ANY:
            return eperm
        ok = allow_fork or low[0] & seccomp.CLONE_THREAD
        return seccomp.RET_ALLOW if ok else eperm
    if name == "socket":
        return seccomp.RET_ALLOW if low[0] in (2, 10) else eperm
    if name == "socketpair":
        ok = low[0] == 1 and low[1] & 0xF == 1
        return seccomp.RET_ALLOW if ok else eperm
    return seccomp.RET_ALLOW


def _expected_process(
    machine: str, allow_exec: bool, allow_fork: bool, nr: int, args: tuple[int, ...]
) -> int:
    """
    The decision of the short per-kind filter, written plainly.
    """
    names = {v: n for n, v in seccomp.SYSCALLS[machine].items()}
    name = names.get(nr)
    eperm = seccomp.RET_ERRNO | errno.EPERM
    if machine == "x86_64" and nr >= 0x40000000:
        return seccomp.RET_KILL_PROCESS
    low = args[0] & 0xFFFFFFFF
    if name in ("unshare", "setns") or (name in seccomp.EXEC and not allow_exec):
        return eperm
    if not allow_fork:
        if name in seccomp.FORK:
            return eperm
        if name == "clone3":
            return seccomp.RET_ERRNO | errno.ENOSYS
        if name == "clone":
            ok = low & seccomp.CLONE_THREAD and not low & seccomp.CLONE_NEW_ANY
            return seccomp.RET_ALLOW if ok else eperm
    return seccomp.RET_ALLOW


_machines = st.sampled_from(sorted(seccomp.SYSCALLS))


@st.composite
def _calls(draw):
    machine = draw(_machines)
    numbers = sorted(seccomp.SYSCALLS[machine].values())
    nr = draw(st.one_of(st.sampled_from(numbers), st.integers(0, 500), st.integers(0, 2**32 - 1)))
    flag_bits = st.sampled_from(
        [seccomp.CLONE_THREAD, 0x100, 0x200, 0x400, 0x800, 0x11, 0x4000, 0x80000, 1, 2, 10, 16, 17]
        + [1 << b for b in range(32)]
    )
    arg = st.one_of(
        st.lists(flag_bits, max_size=4).map(lambda bits: sum(set(bits))),
        st.integers(0, 2**64 - 1),
    )
    args = tuple(draw(st.lists(arg, min_size=6, max_size=6)))
    return machine, draw(st.booleans()), nr, args


class FilterSemanticsTests(SynchronousTestCase):
    """
    The assembled seccomp program decides every system call as the policy
    says.
    """

    @given(_calls())
    def test_decisions(self, call):
        """
        For any system call number and arguments, the filter returns what
        the plainly written policy returns.
        """
        machine, allow_exec, nr, args = call
        arch = seccomp.AUDIT_ARCH[machine]
        for fork, ipc_namespace, deny_ipc in (
            (False, False, True), (True, True, True), (True, False, True), (True, False, False)
        ):
            program = seccomp.build_program(machine, allow_exec, fork, ipc_namespace, deny_ipc)
            self.assertEqual(
                _run_bpf(program, nr, arch, args),
                _expected(machine, allow_exec, nr, args, fork, ipc_namespace, deny_ipc),
                (fork, ipc_namespace, deny_ipc),
            )
        for allow_fork in (False, True):
            program = seccomp.build_process_program(machine, allow_exec, allow_fork)
            self.assertEqual(
                _run_bpf(program, nr, arch, args),
                _expected_process(machine, allow_exec, allow_fork, nr, args),
                allow_fork,
            )

    def test_ipc_denied(self):
        """
        Every System V and POSIX message-queue call is denied by every
        filter a child runs under.
        """
        for machine, table in seccomp.SYSCALLS.items():
            program = seccomp.build_program(machine, True, True, True)
            for name in seccomp.IPC:
                self.assertEqual(
                    _run_bpf(program, table[name], seccomp.AUDIT_ARCH[machine], (0,) * 6),
                    seccomp.RET_ERRNO | errno.EPERM,
                    (machine, name),
                )

    @given(_machines, st.integers(0, 2**32 - 1))
    def test_foreign_arch_killed(self, machine, arch):
        """
        A call made through another audit architecture kills the process.
        """
        if arch == seccomp.AUDIT_ARCH[machine]:
            return
        program = seccomp.build_program(machine, False)
        self.assertEqual(_run_bpf(program, 0, arch, (0,) * 6), seccomp.RET_KILL_PROCESS)

    def test_thread_clone_allowed(self):
        """
        The flags glibc's C{pthread_create} passes to C{clone} are allowed,
        and those of C{fork} and C{posix_spawn} are not.
        """
        program = seccomp.build_program("x86_64", False)
        nr = seccomp.SYSCALLS["x86_64"]["clone"]
        arch = seccomp.AUDIT_ARCH_X86_64
        # CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
        pthread = 0x3D0F00
        fork = 0x01200011  # CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD
        vfork = 0x4111  # CLONE_VM|CLONE_VFORK|SIGCHLD
        self.assertEqual(_run_bpf(program, nr, arch, (pthread, 0, 0, 0, 0, 0)), seccomp.RET_ALLOW)
        for flags in (fork, vfork):
            self.assertEqual(
                _run_bpf(program, nr, arch, (flags, 0, 0, 0, 0, 0)),
                seccomp.RET_ERRNO | errno.EPERM,
            )
