"""
Kernel levers on the cost of a forked child's copy-on-write faults, tried
in a plain Python process whose heap is like a zygote's (asyncio, ssl and
json imported, 20,000 small dicts, the heap frozen): each mode forks
C{--count} children that read (and so write the reference counts of) a
share of the heap and exit, and prints the parent's and the children's
CPU and faults per child, before and after the lever.

    python3 bench/fork_levers.py thp    # huge pages for the heap (MADV_COLLAPSE)
    python3 bench/fork_levers.py pin    # the pages a child writes pinned, copied at fork
    python3 bench/fork_levers.py ipc    # the price of an IPC namespace per fork

Root, Linux 6.1+ for C{thp}, C{io_uring} enabled for C{pin}.  The results
are in bench/RESULTS.md ("two kernel levers tried").
"""

from __future__ import annotations

import argparse
import asyncio  # noqa: F401  (the zygote's image)
import ctypes
import gc
import json
import os
import resource
import ssl  # noqa: F401
import struct
import time

PAGE = os.sysconf("SC_PAGE_SIZE")
HUGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
CLONE_NEWIPC = 0x08000000

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

HEAP = [{"a": i, "b": str(i)} for i in range(20000)]
gc.collect()
gc.freeze()


def child_work() -> None:
    total = 0
    for item in HEAP[::50]:
        total += item["a"]
    json.dumps({"total": total})


def writable_private() -> list[tuple[int, int, str]]:
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1] != "rw-p":
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            out.append((low, high, fields[5] if len(fields) > 5 else ""))
    return out


def forks(count: int, work: bool, before=None) -> str:
    cpu = time.process_time()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(count):
        if before is not None:
            before()
        pid = os.fork()
        if pid == 0:
            if work:
                child_work()
            os._exit(0)
        os.waitpid(pid, 0)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    parent = (time.process_time() - cpu) / count * 1e3
    child = (after.ru_utime + after.ru_stime - reaped.ru_utime - reaped.ru_stime) / count * 1e3
    faults = (after.ru_minflt - reaped.ru_minflt) / count
    return (f"parent {parent:.3f} ms, child {child:.3f} ms, total {parent + child:.3f} ms, "
            f"child faults {faults:.0f}")


def thp(count: int) -> None:
    for work in (False, True):
        print(f"before, child writes={work}: {forks(count, work)}")
    collapsed = 0
    for low, high, path in writable_private():
        if path not in ("", "[heap]"):
            continue
        start, end = -(-low // HUGE) * HUGE, high // HUGE * HUGE
        if end > start and libc.madvise(start, end - start, MADV_HUGEPAGE) == 0:
            if libc.madvise(start, end - start, MADV_COLLAPSE) == 0:
                collapsed += end - start
    print(f"collapsed {collapsed >> 20} MiB into huge pages")
    for work in (False, True):
        print(f"after, child writes={work}: {forks(count, work)}")


def written_by_a_child() -> list[int]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        mappings = writable_private()
        child_work()
        pages = []
        for low, high, _ in mappings:
            data = os.pread(pagemap, (high - low) // PAGE * 8, low // PAGE * 8)
            for index, (entry,) in enumerate(struct.iter_unpack("=Q", data)):
                if entry >> 63 and (entry >> 56) & 1:
                    pages.append(low + index * PAGE)
        os.write(write, struct.pack(f"={len(pages)}Q", *pages))
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 20):
        data += chunk
    os.waitpid(pid, 0)
    return [page for (page,) in struct.iter_unpack("=Q", data)]


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def pin(count: int) -> None:
    print(f"before: {forks(count, True)}")
    pages = sorted(written_by_a_child())
    runs: list[list[int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1][1] += PAGE
        else:
            runs.append([page, PAGE])
    ring = libc.syscall(425, 4, (ctypes.c_char * 120)())
    if ring < 0:
        raise SystemExit(f"io_uring_setup: {os.strerror(ctypes.get_errno())}")
    vectors = (_IOVec * len(runs))(*(_IOVec(a, n) for a, n in runs))
    if libc.syscall(427, ring, 0, vectors, len(runs)) < 0:
        raise SystemExit(f"io_uring_register: {os.strerror(ctypes.get_errno())}")
    print(f"pinned the {len(pages)} pages a child wrote ({len(runs)} runs)")
    for _ in range(2):
        print(f"after: {forks(count, True)}")


def ipc(count: int) -> None:
    def new_namespace() -> None:
        if libc.unshare(CLONE_NEWIPC) != 0:
            raise OSError(ctypes.get_errno(), "unshare")

    print(f"plain forks: {forks(count, False)}")
    print(f"an IPC namespace before each: {forks(count, False, new_namespace)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("thp", "pin", "ipc"))
    parser.add_argument("--count", type=int, default=400)
    options = parser.parse_args()
    {"thp": thp, "pin": pin, "ipc": ipc}[options.mode](options.count)


if __name__ == "__main__":
    main()
