# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
The C library, reached through L{ctypes}, and the few raw system calls the
sandbox needs that Python does not wrap.

This module imports only the standard library: it is loaded by the lean
zygote processes, which must stay free of Twisted and attrs.
"""

from __future__ import annotations

import ctypes
import os
import platform

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.restype = ctypes.c_int
libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]

MACHINE = platform.machine()

#: System call numbers that are the same on x86_64 and aarch64 (the
#: "generic" numbering took them over from x86_64 for new calls).
_COMMON = {
    "landlock_create_ruleset": 444,
    "landlock_add_rule": 445,
    "landlock_restrict_self": 446,
    "close_range": 436,
}


def syscall_number(name: str) -> int:
    """
    The number of a system call on this machine.

    @param name: the system call's name, e.g. C{"landlock_add_rule"}.
    @return: its number.
    @raise KeyError: if the call is unknown here.
    """
    return _COMMON[name]


def check(result: int, what: str) -> int:
    """
    Turn a C-style C{-1} result into an L{OSError}.

    @param result: the C function's return value.
    @param what: what was attempted, for the message.
    @return: C{result} when it is not negative.
    @raise OSError: with the C{errno} of the failed call.
    """
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """
    Call C{prctl(2)}.

    @return: the call's result.
    @raise OSError: if it fails.
    """
    result = libc.prctl(option, arg2, arg3, arg4, arg5)
    if result < 0:
        # (The message is made only then: a forked child calls this.)
        check(result, f"prctl({option})")
    return result


PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_SET_SECCOMP = 22
PR_GET_SECCOMP = 21
PR_SET_PDEATHSIG = 1
SECCOMP_MODE_FILTER = 2

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWIPC = 0x08000000


def close_fds_except(keep_fds: tuple[int, ...] | set[int]) -> None:
    """
    Close every descriptor of this process but C{keep_fds}, with
    C{close_range(2)} (a few system calls, whatever the descriptor limit).

    @param keep_fds: the descriptors to keep open.
    """
    low = 0
    for fd in sorted(set(keep_fds)):
        if fd > low:
            _close_range(low, fd - 1)
        low = max(low, fd + 1)
    _close_range(low, 0xFFFFFFFF)


def _close_range(first: int, last: int) -> None:
    if libc.syscall(
        _COMMON["close_range"], ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(0)
    ) < 0:
        os.closerange(first, min(last + 1, os.sysconf("SC_OPEN_MAX")))


def unshare(flags: int) -> None:
    """
    Call C{unshare(2)} (L{os.unshare} is new in Python 3.12).

    @param flags: C{CLONE_NEW*} flags.
    @raise OSError: if the kernel refuses.
    """
    check(libc.unshare(ctypes.c_int(flags)), "unshare")
