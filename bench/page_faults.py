"""
What a page fault costs on this machine: a zero-fill fault (the first write
to a page of a fresh anonymous mapping) and a copy-on-write fault (the
first write, in a forked child, to a page the parent had written), in CPU
time per fault, beside the same loop when it takes no fault.

A fresh process per request pays for hundreds of these (its writes to the
image it shares with its zygote), and the zygote's forker for dozens; raw
Twisted, the yardstick, pays for none in its steady state.  Run::

    /work/venv/bin/python bench/page_faults.py [--pages 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def _touch(area: mmap.mmap, pages: int, value: int) -> tuple[float, int]:
    """
    Write one byte to each page of C{area}: CPU seconds and minor faults.
    """
    before = _usage()
    for offset in range(0, pages * mmap.PAGESIZE, mmap.PAGESIZE):
        area[offset] = value
    after = _usage()
    return after[0] - before[0], after[1] - before[1]


def one_round(pages: int) -> tuple[float, float, float]:
    """
    @return: µs of CPU per page for a zero-fill fault, for the loop alone,
        and for a copy-on-write fault in a forked child.
    """
    area = mmap.mmap(-1, pages * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fill, _ = _touch(area, pages, 1)
    loop, _ = _touch(area, pages, 2)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            cow, faults = _touch(area, pages, 3)
            os.write(write, f"{cow} {faults}".encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    cow, faults = os.read(read, 100).split()
    os.close(read)
    if int(faults) < pages:
        raise SystemExit(f"the child took {faults} faults for {pages} pages")
    return fill / pages * 1e6, loop / pages * 1e6, float(cow) / pages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    print("| round | zero-fill fault, µs CPU | the loop alone, µs | copy-on-write fault, µs CPU |")
    print("|---:|---:|---:|---:|")
    for number in range(1, options.rounds + 1):
        fill, loop, cow = one_round(options.pages)
        print(f"| {number} | {fill:.2f} | {loop:.2f} | {cow:.2f} |")


if __name__ == "__main__":
    main()
