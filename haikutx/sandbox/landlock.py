# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
Landlock, the unprivileged file-system and network access control of Linux
(5.13+), through its three raw system calls.

A ruleset is built once, in the zygote, by L{build_ruleset}: every access
right the kernel's ABI knows is I{handled} (so denied unless a rule grants
it), and read-only rules are added beneath the interpreter's paths. A
forked child then calls L{restrict_self} on the ruleset's file descriptor,
which costs one system call.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from dataclasses import dataclass

from ._libc import check, libc, syscall_number

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0

# File-system access rights, with the ABI that introduced each.
ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5

ACCESS_NET_BIND_TCP = 1 << 0  # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2

#: Rights granted beneath a read-only path, and beneath a file (a rule on a
#: regular file may only carry file rights).
READ_DIR_RIGHTS = ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR
READ_FILE_RIGHTS = ACCESS_FS_READ_FILE
FILE_ONLY_RIGHTS = (
    ACCESS_FS_EXECUTE
    | ACCESS_FS_WRITE_FILE
    | ACCESS_FS_READ_FILE
    | ACCESS_FS_TRUNCATE
    | ACCESS_FS_IOCTL_DEV
)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def abi_version() -> int:
    """
    The Landlock ABI version this kernel offers.

    @return: the version (1 or more), or C{0} when Landlock is missing or
        disabled at boot.
    """
    result = libc.syscall(
        syscall_number("landlock_create_ruleset"),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(result, 0)


def fs_rights(abi: int) -> int:
    """
    Every file-system access right known to a Landlock ABI.

    @param abi: the ABI version.
    @return: the bit mask of rights to handle.
    """
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= ACCESS_FS_REFER
    if abi >= 3:
        rights |= ACCESS_FS_TRUNCATE
    if abi >= 5:
        rights |= ACCESS_FS_IOCTL_DEV
    return rights


@dataclass(frozen=True)
class RulesetSummary:
    """
    What a built ruleset enforces.

    @ivar abi: the Landlock ABI used.
    @ivar fs_rights: the file-system rights handled (denied unless granted).
    @ivar net_rights: the network rights handled.
    @ivar scopes: the scopes (signal, abstract unix socket) enforced.
    @ivar read_paths: the paths granted read access.
    @ivar exec_paths: the paths granted execute access.
    @ivar skipped: paths that were asked for but do not exist.
    """

    abi: int
    fs_rights: int
    net_rights: int
    scopes: int
    read_paths: tuple[str, ...]
    exec_paths: tuple[str, ...]
    skipped: tuple[str, ...]


def _add_path_rule(ruleset_fd: int, path: str, rights: int) -> bool:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not os.path.isdir(path):
            rights &= FILE_ONLY_RIGHTS
        attr = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        check(
            libc.syscall(
                syscall_number("landlock_add_rule"),
                ctypes.c_int(ruleset_fd),
                ctypes.c_int(RULE_PATH_BENEATH),
                ctypes.byref(attr),
                ctypes.c_uint32(0),
            ),
            f"landlock_add_rule({path})",
        )
    finally:
        os.close(fd)
    return True


def build_ruleset(
    abi: int,
    read_paths: Iterable[str],
    exec_paths: Iterable[str] = (),
    connect_ports: Iterable[int] | None = None,
    write_paths: Iterable[str] = (),
) -> tuple[int, RulesetSummary]:
    """
    Create a Landlock ruleset that grants read access beneath C{read_paths},
    execute access beneath C{exec_paths}, and nothing else: no writes, no
    TCP bind (ABI 4+), no signals or abstract unix sockets outside the
    domain (ABI 6+).

    @param abi: the ABI version to use (from L{abi_version}).
    @param read_paths: files and directories that may be read.
    @param exec_paths: files and directories that may be executed (and
        read).
    @param connect_ports: when not C{None} (and ABI 4+), the only TCP ports
        that may be connected to; when C{None}, TCP connect is not
        restricted by Landlock.
    @param write_paths: files (not directories) that may be read and
        written, such as C{/dev/null}.
    @return: the ruleset file descriptor (inheritable, so that a forked
        child can use it) and a summary.
    @raise OSError: if the kernel refuses.
    """
    handled_fs = fs_rights(abi)
    handled_net = 0
    scopes = 0
    size = 8
    if abi >= 4:
        handled_net = ACCESS_NET_BIND_TCP
        if connect_ports is not None:
            handled_net |= ACCESS_NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        scopes = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    attr = _RulesetAttr(
        handled_access_fs=handled_fs, handled_access_net=handled_net, scoped=scopes
    )
    fd = check(
        libc.syscall(
            syscall_number("landlock_create_ruleset"),
            ctypes.byref(attr),
            ctypes.c_size_t(size),
            ctypes.c_uint32(0),
        ),
        "landlock_create_ruleset",
    )
    granted_read: list[str] = []
    granted_exec: list[str] = []
    skipped: list[str] = []
    try:
        read_rights = ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR
        for path in dict.fromkeys(read_paths):
            (granted_read if _add_path_rule(fd, path, read_rights) else skipped).append(
                path
            )
        for path in dict.fromkeys(exec_paths):
            rights = read_rights | ACCESS_FS_EXECUTE
            (granted_exec if _add_path_rule(fd, path, rights) else skipped).append(path)
        for path in dict.fromkeys(write_paths):
            if os.path.isdir(path):
                continue
            rights = (ACCESS_FS_READ_FILE | ACCESS_FS_WRITE_FILE) | (
                ACCESS_FS_TRUNCATE if abi >= 3 else 0
            )
            (granted_read if _add_path_rule(fd, path, rights) else skipped).append(path)
        if connect_ports is not None and abi >= 4:
            for port in connect_ports:
                net = _NetPortAttr(allowed_access=ACCESS_NET_CONNECT_TCP, port=port)
                check(
                    libc.syscall(
                        syscall_number("landlock_add_rule"),
                        ctypes.c_int(fd),
                        ctypes.c_int(RULE_NET_PORT),
                        ctypes.byref(net),
                        ctypes.c_uint32(0),
                    ),
                    f"landlock_add_rule(port {port})",
                )
    except BaseException:
        os.close(fd)
        raise
    os.set_inheritable(fd, True)
    return fd, RulesetSummary(
        abi=abi,
        fs_rights=handled_fs,
        net_rights=handled_net,
        scopes=scopes,
        read_paths=tuple(granted_read),
        exec_paths=tuple(granted_exec),
        skipped=tuple(skipped),
    )


def restrict_self(ruleset_fd: int) -> None:
    """
    Confine the calling thread (and its future children) to a ruleset.
    C{no_new_privs} must already be set.

    @param ruleset_fd: a descriptor from L{build_ruleset}.
    @raise OSError: if the kernel refuses.
    """
    check(
        libc.syscall(
            syscall_number("landlock_restrict_self"),
            ctypes.c_int(ruleset_fd),
            ctypes.c_uint32(0),
        ),
        "landlock_restrict_self",
    )


class OwnDomain:
    """
    A Landlock layer of a process's own, made and dropped by that process
    (L{enter}); its arguments are made once, where it is prepared (a
    zygote, for all its children), so that a forked child only makes the
    system calls.  The layer scopes signals and abstract unix sockets to
    the process and its children (ABI 6+), so that it cannot signal its
    zygote or a sibling, and with C{deny_exec} forbids executing any file.

    @ivar adds: whether entering it adds a layer (C{False} when the ABI
        has nothing to add).
    """

    def __init__(self, abi: int, deny_exec: bool) -> None:
        """
        @param abi: the Landlock ABI (from L{abi_version}).
        @param deny_exec: also deny C{execve} of every file.
        """
        handled_fs = ACCESS_FS_EXECUTE if deny_exec and abi >= 1 else 0
        scopes = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
        self.adds = bool(handled_fs or scopes)
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        self._attr = _RulesetAttr(
            handled_access_fs=handled_fs, handled_access_net=0, scoped=scopes
        )
        self._create = (
            syscall_number("landlock_create_ruleset"),
            ctypes.byref(self._attr),
            ctypes.c_size_t(size),
            ctypes.c_uint32(0),
        )
        self._restrict = syscall_number("landlock_restrict_self")
        self._flags = ctypes.c_uint32(0)
        self._syscall = libc.syscall

    def enter(self) -> bool:
        """
        Stack the layer on the calling process: its ruleset descriptor is
        closed before this returns, so no handler ever holds one.

        @return: whether a layer was added.
        @raise OSError: if the kernel refuses.
        """
        if not self.adds:
            return False
        fd = check(self._syscall(*self._create), "landlock_create_ruleset")
        try:
            check(
                self._syscall(self._restrict, ctypes.c_int(fd), self._flags),
                "landlock_restrict_self",
            )
        finally:
            os.close(fd)
        return True


def enter_own_domain(abi: int, deny_exec: bool) -> bool:
    """
    Stack a Landlock layer of the calling process's own (L{OwnDomain}).

    @param abi: the Landlock ABI (from L{abi_version}).
    @param deny_exec: also deny C{execve} of every file.
    @return: whether a layer was added (C{False} when the ABI has nothing
        to add).
    @raise OSError: if the kernel refuses.
    """
    return OwnDomain(abi, deny_exec).enter()
