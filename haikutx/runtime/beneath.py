# -*- test-case-name: haikutx.test.test_loader -*-
"""
Open a file by a relative name strictly beneath a directory, symlinks
included: the local handlers directory (C{--handlers}) is read by the server,
often as root, so a link inside it must never lead the server out of it.

On Linux 5.6 and later the kernel resolves the name: C{openat2(2)} with
C{RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS} on a descriptor of the directory
refuses, atomically, any step (C{..}, an absolute name, an absolute or
escaping symlink, a C{/proc} magic link) that would leave it.  Because the
check and the open are one system call, a link swapped in between cannot
win a race.  Where C{openat2} is missing (an older kernel, or refused by a
seccomp filter), the name is resolved with C{realpath}, compared with the
directory's real path, opened without following a final symlink, and the
opened file compared (device and inode) with the resolved one; that closes
all but a race against whoever can write the directory itself, which is the
operator.

These functions block (file system calls): call them off the reactor thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Callable

#: The C{openat2} system call number: the same on every architecture Linux
#: added it to at once (5.6), bar alpha.
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08

#: Flags of every open: never block on a FIFO, never become a terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class OutsideDirectory(Exception):
    """
    The name leads outside the directory (through C{..}, an absolute name or
    a symlink).
    """


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def _load_openat2() -> Callable[[int, bytes], int] | None:
    if platform.system() != "Linux" or platform.machine() == "alpha":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syscall = libc.syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    how = _OpenHow(_OPEN_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)

    def openat2(dirfd: int, name: bytes) -> int:
        fd = syscall(
            ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(name),
            ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return int(fd)

    return openat2


_openat2 = _load_openat2()


def open_beneath(directory: str, name: str) -> int:
    """
    Open C{name}, relative to C{directory}, for reading, without leaving
    C{directory} on the way.

    @param directory: the directory (itself may be reached through symlinks).
    @param name: a relative name; symlinks in it are followed only while they
        stay inside C{directory}.
    @return: a file descriptor (the caller closes it).
    @raise OutsideDirectory: when the name leads outside C{directory}.
    @raise OSError: when there is no such file or it cannot be opened.
    """
    global _openat2
    if name.startswith("/"):
        raise OutsideDirectory(name)
    encoded = os.fsencode(name)
    if _openat2 is not None:
        dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _openat2(dirfd, encoded)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise OutsideDirectory(name) from None
            if e.errno not in (errno.ENOSYS, errno.EPERM):
                raise
            # No openat2 here (or a filter refuses it): use the fallback from now on.
            _openat2 = None
        finally:
            os.close(dirfd)
    return _open_by_real_path(directory, name)


def _open_by_real_path(directory: str, name: str) -> int:
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root:
        raise OutsideDirectory(name)
    fd = os.open(target, _OPEN_FLAGS | os.O_NOFOLLOW)
    try:
        opened = os.fstat(fd)
        resolved = os.stat(target)
        if (opened.st_dev, opened.st_ino) != (resolved.st_dev, resolved.st_ino):
            raise OutsideDirectory(name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(fd: int, limit: int) -> bytes | None:
    """
    Read at most C{limit} bytes from C{fd} if it is a regular file, and close
    it.

    @return: the bytes, or C{None} when C{fd} is not a regular file.
    """
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        os.set_blocking(fd, True)
        chunks = []
        remaining = limit
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def using_openat2() -> bool:
    """
    Whether names are resolved by the kernel (C{openat2}) here.
    """
    return _openat2 is not None
