# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
Resource limits, C{no_new_privs}, and the switch to an unprivileged uid/gid
that keeps only C{CAP_DAC_READ_SEARCH} (so a handler can still read an
interpreter installed under a directory its uid cannot enter, while
Landlock decides what it may read).
"""

from __future__ import annotations

import ctypes
import os
import resource
from dataclasses import dataclass

from ._libc import (
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_RAISE,
    PR_CAPBSET_DROP,
    PR_SET_KEEPCAPS,
    PR_SET_NO_NEW_PRIVS,
    check,
    libc,
    prctl,
)

CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def last_capability() -> int:
    """
    The highest capability number this kernel knows.
    """
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def set_capabilities(effective: int, permitted: int, inheritable: int) -> None:
    """
    Set this thread's capability sets with C{capset(2)}.

    @param effective: bit mask of capabilities (bit n = capability n).
    @param permitted: likewise.
    @param inheritable: likewise.
    @raise OSError: if the kernel refuses.
    """
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> (32 * i)) & 0xFFFFFFFF
    check(libc.capset(ctypes.byref(header), data), "capset")


def get_capabilities() -> tuple[int, int, int]:
    """
    This thread's capability sets, with C{capget(2)} (no file access, so it
    works inside the sandbox).

    @return: the effective, permitted and inheritable masks.
    """
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc.capget(ctypes.byref(header), data), "capget")
    return tuple(  # type: ignore[return-value]
        data[0].__getattribute__(name) | (data[1].__getattribute__(name) << 32)
        for name in ("effective", "permitted", "inheritable")
    )


@dataclass(frozen=True)
class Identity:
    """
    The unprivileged user a handler process runs as.

    @ivar uid: its user id (never 0).
    @ivar gid: its group id (never 0).
    @ivar keep_read_capability: keep C{CAP_DAC_READ_SEARCH} across the
        switch (only safe when Landlock confines reads).
    """

    uid: int
    gid: int
    keep_read_capability: bool = True

    def __post_init__(self) -> None:
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError("a handler identity must not be root")


class PreparedIdentity:
    """
    The C{capset} arguments of an identity switch, built once in the
    zygote so that the forked child only makes system calls.
    """

    def __init__(self, identity: Identity, last_cap: int, ambient: bool) -> None:
        self.identity = identity
        self.ambient = ambient
        keep = identity.keep_read_capability
        self.drop = tuple(
            cap for cap in range(last_cap + 1) if not (keep and cap == CAP_DAC_READ_SEARCH)
        )
        mask = (1 << CAP_DAC_READ_SEARCH) if keep else 0
        self._header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        self._data = (_CapData * 2)()
        self._data[0].effective = mask
        self._data[0].permitted = mask
        self._data[0].inheritable = mask if ambient else 0
        self._header_ref = ctypes.byref(self._header)
        # Looked up here, once: the C library's first lookup of a name
        # (dlsym, and the new function object) writes 40 pages of a child.
        self._capset = libc.capset


def drop_bounding_set(prepared: PreparedIdentity) -> None:
    """
    Empty the capability bounding set but for what the identity keeps
    (C{PR_CAPBSET_DROP}, one call per capability).  Forked children inherit
    the bounding set, so a zygote calls this once for all its children,
    which then skip it in L{switch_identity}: the zygote's own effective
    capabilities are untouched (the bounding set only limits what C{execve}
    grants, and a zygote never executes anything).

    @raise OSError: if a drop fails (the caller must exit).
    """
    _prctl = libc.prctl
    for cap in prepared.drop:
        if _prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0:
            check(-1, "PR_CAPBSET_DROP")


def prepare_children(prepared: PreparedIdentity) -> None:
    """
    In a zygote, once, what every child's switch to the prepared identity
    would repeat and the children inherit: the emptied bounding set
    (L{drop_bounding_set}), no supplementary groups, and C{keep_caps} set
    when a capability is to be kept (a securebit, inherited by C{fork};
    only a change of uid away from 0 reads it, which the zygote never
    makes).  Its children then switch with C{zygote_prepared=True}
    (L{switch_identity}).

    @raise OSError: if a step fails (the caller must exit).
    """
    drop_bounding_set(prepared)
    os.setgroups([])
    if prepared.identity.keep_read_capability:
        prctl(PR_SET_KEEPCAPS, 1)


def switch_identity(prepared: PreparedIdentity, zygote_prepared: bool = False) -> None:
    """
    Become the prepared identity for good (real, effective and saved ids;
    no supplementary groups), keeping at most C{CAP_DAC_READ_SEARCH} (in
    the ambient set too when exec is allowed, so that it survives
    C{execve} of an interpreter). Must be called as root.

    @param prepared: from L{PreparedIdentity}, made in the zygote.
    @param zygote_prepared: the zygote already did L{prepare_children},
        whose effects this process inherited.
    @raise OSError: if a step fails (the caller must then exit).
    """
    identity = prepared.identity
    keep = identity.keep_read_capability
    if not zygote_prepared:
        drop_bounding_set(prepared)
        if keep:
            prctl(PR_SET_KEEPCAPS, 1)
        os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    if keep:
        check(prepared._capset(prepared._header_ref, prepared._data), "capset")
        prctl(PR_SET_KEEPCAPS, 0)
        if prepared.ambient:
            prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH)


def tune_threads(stack_size: int) -> None:
    """
    Make threads cheap in address space, so that C{RLIMIT_AS} leaves room
    for more than a handful: a smaller thread stack (the default is
    C{RLIMIT_STACK}, 8 MiB) and at most two malloc arenas (glibc reserves
    64 MiB of address space per arena, one per thread by default).
    Process-wide and inherited by forked children: call in the zygote.

    @param stack_size: the stack of new threads, in bytes.
    """
    import _thread

    _thread.stack_size(stack_size)
    M_ARENA_MAX = -8
    try:
        libc.mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(2))
    except AttributeError:  # not glibc
        pass


def set_no_new_privs() -> None:
    """
    Set C{PR_SET_NO_NEW_PRIVS}: no set-uid bit or file capability can ever
    raise this process's privileges again (required by Landlock and seccomp
    for an unprivileged process).
    """
    prctl(PR_SET_NO_NEW_PRIVS, 1)


@dataclass(frozen=True)
class ResourceLimits:
    """
    The rlimits of one handler process; each is set as both soft and hard
    limit, except CPU whose hard limit is one second later (C{SIGXCPU},
    then C{SIGKILL}).

    @ivar address_space: C{RLIMIT_AS} in bytes (C{--maxmemory}).
    @ivar cpu_seconds: C{RLIMIT_CPU}.
    @ivar open_files: C{RLIMIT_NOFILE}.
    @ivar processes: C{RLIMIT_NPROC} (tasks of the uid, threads included),
        or C{None} to leave it (it only means something with a uid of the
        handler's own).
    @ivar file_size: C{RLIMIT_FSIZE}: 0, no file can grow (stdio must be
        pipes, not files).
    """

    address_space: int = 256 * 1024 * 1024
    cpu_seconds: int = 6
    open_files: int = 64
    processes: int | None = None
    file_size: int = 0

    def as_setrlimit(self) -> tuple[tuple[int, tuple[int, int]], ...]:
        """
        The C{(resource, (soft, hard))} pairs to apply, in order.
        """
        pairs = [
            (resource.RLIMIT_CORE, (0, 0)),
            (resource.RLIMIT_FSIZE, (self.file_size, self.file_size)),
            (resource.RLIMIT_NOFILE, (self.open_files, self.open_files)),
            (resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds + 1)),
            (resource.RLIMIT_AS, (self.address_space, self.address_space)),
            (resource.RLIMIT_MEMLOCK, (0, 0)),
            (resource.RLIMIT_MSGQUEUE, (0, 0)),
        ]
        if self.processes is not None:
            pairs.append((resource.RLIMIT_NPROC, (self.processes, self.processes)))
        return tuple(pairs)


def clamp_limits(
    pairs: tuple[tuple[int, tuple[int, int]], ...]
) -> tuple[tuple[int, tuple[int, int]], ...]:
    """
    Lower each requested limit to this process's hard limit where that is
    already lower (a limit is never raised). Done once, in the zygote.

    @param pairs: from L{ResourceLimits.as_setrlimit}.
    @return: the pairs to pass to L{apply_limits}.
    """
    out = []
    for res, (soft, hard) in pairs:
        _, cur_hard = resource.getrlimit(res)
        if cur_hard != resource.RLIM_INFINITY and cur_hard < hard:
            hard = cur_hard
            soft = min(soft, hard)
        out.append((res, (soft, hard)))
    return tuple(out)


def apply_limits(pairs: tuple[tuple[int, tuple[int, int]], ...]) -> None:
    """
    Apply rlimits from L{clamp_limits}.

    @raise OSError: if the kernel refuses one.
    """
    for res, limits in pairs:
        resource.setrlimit(res, limits)
