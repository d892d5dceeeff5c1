# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
The sandbox of a handler process, in two steps: L{prepare} once in the
zygote (everything that can be computed ahead: the Landlock ruleset, the
seccomp program, the limits, the identity), then L{PreparedSandbox.apply}
in each forked child before any handler code runs (a few system calls).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import sys
from dataclasses import dataclass, field

from . import landlock, privileges, seccomp
from . import landlock as _landlock
from ._libc import MACHINE, PR_SET_PDEATHSIG, close_fds_except, libc, prctl, syscall_number
from .privileges import Identity, ResourceLimits

_CLOSE_RANGE = syscall_number("close_range")

#: System files a Python handler (or an interpreter) needs to read: shared
#: libraries, TLS trust, name resolution, time zones, random devices.
SYSTEM_READ_PATHS = (
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/etc/ssl/certs",  # not /etc/ssl: /etc/ssl/private holds keys
    "/etc/ssl/openssl.cnf",
    "/usr/share/ca-certificates",
    "/etc/ca-certificates",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/etc/mime.types",
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
)


class SandboxError(Exception):
    """
    The sandbox could not be prepared or applied; the process must not run
    handler code.
    """


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def interpreter_read_paths() -> tuple[str, ...]:
    """
    The paths this Python interpreter needs to read to import the standard
    library, the packages installed beside haikutx, and haikutx itself,
    and to make TLS connections: its prefixes (a virtual environment's and
    the base one), the C{sys.path} entries beneath them, the haikutx
    package directory, the real executable's directory, OpenSSL's default
    trust paths, and L{SYSTEM_READ_PATHS}.

    C{sys.path} entries outside the prefixes (the current directory, a
    C{PYTHONPATH}) are left out on purpose: they may hold anything.
    """
    prefixes = tuple(
        os.path.realpath(p)
        for p in dict.fromkeys(
            [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
        )
    )
    # A virtual environment's or pyenv's prefix is the Python installation;
    # a system prefix (/usr) holds much more, so only its sys.path entries
    # (and a pyvenv.cfg) are granted there.
    system = ("/", "/usr", "/usr/local")
    paths: list[str] = [p for p in prefixes if p not in system]
    paths += [os.path.join(p, "pyvenv.cfg") for p in prefixes]
    for entry in sys.path:
        if entry and os.path.isabs(entry) and _under(os.path.realpath(entry), prefixes):
            paths.append(entry)
    import haikutx

    paths.append(os.path.dirname(os.path.abspath(haikutx.__file__)))
    paths.append(os.path.dirname(os.path.realpath(sys.executable)))
    import ssl

    verify = ssl.get_default_verify_paths()
    for p in (verify.cafile, verify.capath, verify.openssl_cafile, verify.openssl_capath):
        if p:
            paths.append(p)
    paths += SYSTEM_READ_PATHS
    return tuple(dict.fromkeys(paths))


def elf_interpreter(path: str) -> str | None:
    """
    The program interpreter (dynamic loader) named in an ELF executable's
    C{PT_INTERP} header: the kernel opens it for execution too, so Landlock
    must allow executing it as well.

    @param path: an executable.
    @return: the loader's path, or C{None} for a script or a static binary.
    """
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None  # only 64-bit little-endian ELF is read
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            for i in range(phnum):
                f.seek(phoff + i * phentsize)
                ptype, _, offset, _, _, filesz = struct.unpack("<IIQQQQ", f.read(40))
                if ptype == 3:
                    f.seek(offset)
                    return f.read(filesz).rstrip(b"\0").decode()
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    return None


def identity_for(
    user: str | None = None, slot: int = 0, base_uid: int | None = None
) -> Identity | None:
    """
    The identity of a worker slot's handler processes.

    @param user: C{--user}: a name or a numeric uid; C{None} for C{nobody}.
    @param slot: the worker slot number (0-based).
    @param base_uid: when given, the slot runs as uid and gid
        C{base_uid + slot}, so that C{RLIMIT_NPROC} counts that slot's
        processes alone.
    @return: the identity, or C{None} when this process is not root (no
        switch is possible or needed).
    @raise SandboxError: for an unknown user or a root identity.
    """
    if os.geteuid() != 0:
        return None
    if base_uid is not None:
        uid = gid = base_uid + slot
    else:
        name = user or "nobody"
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, ValueError) as e:
            raise SandboxError(f"--user: no such user: {name}") from e
        uid, gid = entry.pw_uid, entry.pw_gid
    try:
        return Identity(uid, gid)
    except ValueError as e:
        raise SandboxError(f"--user: {e}") from e


@dataclass(frozen=True)
class SandboxPolicy:
    """
    What a handler process is allowed.

    @ivar limits: its rlimits.
    @ivar identity: the unprivileged user to become (only as root), or
        C{None} to keep the current one.
    @ivar allow_exec: keep C{execve} (stdio interpreters): Landlock then
        allows executing only beneath C{exec_paths}.
    @ivar exec_paths: what may be executed when C{allow_exec}.
    @ivar write_paths: files that may be written (C{/dev/null}).
    @ivar read_paths: what may be read; by default the interpreter's paths
        (L{interpreter_read_paths}).
    @ivar extra_read_paths: added to C{read_paths}.
    @ivar connect_ports: when not C{None}, the only TCP ports a handler may
        connect to (Landlock ABI 4+); with the network namespace, the
        egress relay's port.
    @ivar thread_stack_size: the stack size of threads (see
        L{privileges.tune_threads}).
    @ivar max_threads: C{RLIMIT_NPROC} when the identity is a uid of the
        slot's own (threads count as tasks); with a shared uid such as
        C{nobody} or no switch, threads are bounded by C{RLIMIT_AS} only.
    """

    limits: ResourceLimits = field(default_factory=ResourceLimits)
    identity: Identity | None = None
    allow_exec: bool = False
    exec_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    read_paths: tuple[str, ...] | None = None
    extra_read_paths: tuple[str, ...] = ()
    connect_ports: tuple[int, ...] | None = None
    max_threads: int | None = None
    thread_stack_size: int = 1024 * 1024


@dataclass(frozen=True)
class PreparedSandbox:
    """
    A policy turned into kernel objects, made once in the zygote; L{apply}
    it in each forked child.

    @ivar policy: the policy.
    @ivar layers: for each layer (C{"rlimits"}, C{"no_new_privs"},
        C{"landlock"}, C{"seccomp"}, C{"uid"}), C{"active"} or why not.
    @ivar ruleset_fd: the Landlock ruleset descriptor, or -1.
    @ivar ruleset: what the ruleset enforces, or C{None}.
    @ivar filter: the seccomp program, or C{None}.
    """

    policy: SandboxPolicy
    layers: dict[str, str]
    ruleset_fd: int
    ruleset: landlock.RulesetSummary | None
    filter: seccomp.Filter | None
    _limits: tuple[tuple[int, tuple[int, int]], ...]
    _identity: privileges.PreparedIdentity | None

    def apply(
        self,
        keep_fds: tuple[int, ...] = (0, 1, 2),
        parent_death_signal: int | None = None,
    ) -> None:
        """
        Sandbox the calling process, which must be single-threaded (a
        freshly forked child). In order: close every descriptor but
        C{keep_fds}, rlimits, uid/gid switch, C{no_new_privs}, Landlock,
        seccomp. Nothing is undone on failure: the caller must
        C{os._exit} if this raises.

        @param keep_fds: descriptors to keep open (stdio, control pipes).
        @param parent_death_signal: a signal this process gets when its
            parent dies (set after the uid switch, which would clear it).
        @raise SandboxError: if a layer that was prepared fails to apply.
        """
        try:
            ruleset_fd = self.ruleset_fd
            close_fds_except(keep_fds + ((ruleset_fd,) if ruleset_fd >= 0 else ()))
            privileges.apply_limits(self._limits)
            if self._identity is not None:
                privileges.switch_identity(self._identity)
            if parent_death_signal is not None:
                prctl(PR_SET_PDEATHSIG, parent_death_signal)
            privileges.set_no_new_privs()
            if ruleset_fd >= 0:
                landlock.restrict_self(ruleset_fd)
                if ruleset_fd not in keep_fds:
                    os.close(ruleset_fd)
            if self.filter is not None:
                seccomp.install(self.filter)
        except OSError as e:
            raise SandboxError(f"sandbox: {e}") from e

    def apply_to_zygote(self) -> None:
        """
        Apply C{no_new_privs}, the Landlock ruleset and the seccomp filter
        to the calling process (a zygote, before its first fork), and close
        the ruleset descriptor: its children inherit the domain and hold no
        ruleset.  Limits and identity are left to each child.

        @raise SandboxError: if a layer fails (the caller must exit).
        """
        try:
            privileges.set_no_new_privs()
            if self.ruleset_fd >= 0:
                landlock.restrict_self(self.ruleset_fd)
            if self.filter is not None:
                seccomp.install(self.filter)
        except OSError as e:
            raise SandboxError(f"sandbox: {e}") from e
        finally:
            self.close()

    def close(self) -> None:
        """
        Release the ruleset descriptor (in the zygote, when done); calling
        it again does nothing.
        """
        if self.ruleset_fd >= 0:
            os.close(self.ruleset_fd)
            object.__setattr__(self, "ruleset_fd", -1)

    def describe(self) -> dict[str, object]:
        """
        A JSON-able summary for start-up logs and C{/_haiku/status}.
        """
        out: dict[str, object] = {"layers": dict(self.layers)}
        out["limits"] = {
            "address_space": self.policy.limits.address_space,
            "cpu_seconds": self.policy.limits.cpu_seconds,
            "open_files": self.policy.limits.open_files,
            "processes": self.policy.limits.processes,
            "file_size": self.policy.limits.file_size,
        }
        if self.policy.identity is not None:
            out["uid"] = self.policy.identity.uid
            out["gid"] = self.policy.identity.gid
        if self.ruleset is not None:
            out["landlock_abi"] = self.ruleset.abi
            out["read_paths"] = list(self.ruleset.read_paths)
            out["exec_paths"] = list(self.ruleset.exec_paths)
        out["exec_allowed"] = self.policy.allow_exec
        return out


def prepare(
    policy: SandboxPolicy,
    allow_fork: bool = False,
    allow_ipc_namespace: bool = False,
    landlock: bool = True,
    seccomp_filter: bool = True,
    deny_ipc: bool = True,
) -> PreparedSandbox:
    """
    Turn a policy into kernel objects, once, in the zygote. Layers the
    kernel lacks are skipped and say why in L{PreparedSandbox.layers}.

    @param policy: the policy.
    @param allow_fork: the filter allows new processes (a zygote's common
        filter; see L{seccomp.build_program}).
    @param allow_ipc_namespace: the filter allows C{unshare(CLONE_NEWIPC)}.
    @param landlock: build the Landlock ruleset (C{False}: turned off).
    @param seccomp_filter: build the seccomp filter (C{False}: turned off).
    @param deny_ipc: the filter denies System V and POSIX message-queue IPC.
    @return: the prepared sandbox.
    @raise SandboxError: for an identity switch asked of a non-root
        process, or a kernel that refuses a layer it claims to have.
    """
    from .probe import probe

    found = probe()
    layers: dict[str, str] = {}
    limits = policy.limits
    if policy.identity is not None and policy.max_threads is not None:
        limits = ResourceLimits(
            address_space=limits.address_space,
            cpu_seconds=limits.cpu_seconds,
            open_files=limits.open_files,
            processes=policy.max_threads,
            file_size=limits.file_size,
        )
    clamped = privileges.clamp_limits(limits.as_setrlimit())
    privileges.tune_threads(policy.thread_stack_size)
    layers["rlimits"] = "active"
    layers["no_new_privs"] = "active"

    identity = policy.identity
    if identity is not None:
        if os.geteuid() != 0:
            raise SandboxError("switching to another uid needs root")
        if identity.keep_read_capability and found.landlock_abi < 1:
            # Without Landlock, CAP_DAC_READ_SEARCH would let a handler
            # read every file: drop it, and rely on file modes.
            identity = Identity(identity.uid, identity.gid, keep_read_capability=False)
            policy = _replace(policy, identity=identity)
        layers["uid"] = "active"
    else:
        layers["uid"] = (
            "not root: handlers run as this process's uid"
            if os.geteuid() != 0
            else "no identity given: handlers run as root"
        )

    ruleset_fd = -1
    summary = None
    if found.landlock_abi >= 1 and landlock:
        read = policy.read_paths if policy.read_paths is not None else interpreter_read_paths()
        read = tuple(read) + tuple(policy.extra_read_paths)
        exec_paths: tuple[str, ...] = ()
        if policy.allow_exec:
            exec_paths = tuple(policy.exec_paths)
            loaders = (elf_interpreter(p) for p in exec_paths if os.path.isfile(p))
            exec_paths += tuple(p for p in loaders if p)
        try:
            ruleset_fd, summary = _landlock.build_ruleset(
                found.landlock_abi, read, exec_paths, policy.connect_ports,
                write_paths=policy.write_paths,
            )
        except OSError as e:
            raise SandboxError(f"Landlock: {e}") from e
        layers["landlock"] = "active"
    else:
        layers["landlock"] = found.reasons.get("landlock", "turned off by name")

    identity = policy.identity
    if (
        identity is not None
        and identity.keep_read_capability
        and summary is not None
        and all(_world_readable(p) for p in summary.read_paths + summary.exec_paths)
    ):
        # Every granted path is readable by any uid (e.g. a system Python
        # in /usr): the capability is not needed, so it is not kept.
        policy = _replace(
            policy, identity=Identity(identity.uid, identity.gid, keep_read_capability=False)
        )
    if policy.identity is not None:
        layers["uid"] = (
            "active, keeping CAP_DAC_READ_SEARCH (the interpreter is not readable by every uid)"
            if policy.identity.keep_read_capability
            else "active, no capabilities"
        )

    program = None
    if found.seccomp and seccomp_filter:
        program = seccomp.build_filter(
            policy.allow_exec, MACHINE, allow_fork=allow_fork,
            allow_ipc_namespace=allow_ipc_namespace, deny_ipc=deny_ipc,
        )
        layers["seccomp"] = "active"
    else:
        layers["seccomp"] = found.reasons.get("seccomp", "turned off by name")
    _warm_up()
    return PreparedSandbox(
        policy=policy,
        layers=layers,
        ruleset_fd=ruleset_fd,
        ruleset=summary,
        filter=program,
        _limits=clamped,
        _identity=(
            privileges.PreparedIdentity(
                policy.identity, privileges.last_capability(), policy.allow_exec
            )
            if policy.identity is not None
            else None
        ),
    )


def _warm_up() -> None:
    # The first call through a ctypes function in a process is slow (about
    # 0.15 ms each in a forked child); make every call apply() uses once
    # here, in the zygote, so that children inherit the warm state.
    from ._libc import PR_GET_NO_NEW_PRIVS

    libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
    libc.syscall(_CLOSE_RANGE, ctypes.c_uint(1), ctypes.c_uint(0), ctypes.c_uint(0))
    privileges.get_capabilities()


def _world_readable(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True  # skipped by the ruleset anyway
    import stat

    if not mode & stat.S_IROTH or (stat.S_ISDIR(mode) and not mode & stat.S_IXOTH):
        return False
    parent = os.path.dirname(os.path.realpath(path))
    while parent != "/":
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(parent)
    return True


def _replace(policy: SandboxPolicy, **changes: object) -> SandboxPolicy:
    import dataclasses

    return dataclasses.replace(policy, **changes)  # type: ignore[arg-type]
