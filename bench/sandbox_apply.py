"""
Per-child cost of the sandbox: fork + apply + exit + reap, against a bare
fork + exit + reap, from a lean zygote-like process (standard library and
haikutx.sandbox only).

    python bench/sandbox_apply.py [--count 200]

Prints milliseconds per child (mean, p50, p99) and the apply step alone as
measured inside the child.
"""

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from haikutx.sandbox import (  # noqa: E402
    SandboxPolicy,
    enter_network_namespace,
    identity_for,
    prepare,
    probe,
)


def run(count, sandbox):
    totals, applies = [], []
    r, w = os.pipe()
    for _ in range(count):
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            t0 = time.perf_counter()
            if sandbox is not None:
                sandbox.apply(keep_fds=(0, 1, 2, w))
            os.write(w, str(time.perf_counter() - t0).encode().ljust(32))
            os._exit(0)
        os.waitpid(pid, 0)
        totals.append((time.perf_counter() - start) * 1000)
        applies.append(float(os.read(r, 32)) * 1000)
    os.close(r)
    os.close(w)
    return totals, applies


def summary(values):
    values = sorted(values)
    return (
        f"mean {statistics.mean(values):.3f}  p50 {values[len(values) // 2]:.3f}  "
        f"p99 {values[int(len(values) * 0.99) - 1]:.3f}"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    layers = probe()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, kernel {platform.release()}, "
          f"Python {platform.python_version()}, Landlock ABI {layers.landlock_abi}, "
          f"root {layers.root}")
    cases = [("bare fork+exit", None)]
    cases.append(("fork+apply (no uid switch)", prepare(SandboxPolicy())))
    identity = identity_for(None, 0, base_uid=64000)
    if identity is not None:
        cases.append(
            ("fork+apply (uid switch, keep CAP_DAC_READ_SEARCH)",
             prepare(SandboxPolicy(identity=identity, max_threads=64))),
        )
    run(20, None)  # warm up
    for name, sandbox in cases:
        totals, applies = run(args.count, sandbox)
        print(f"{name:52s} per child ms: {summary(totals)} | apply alone ms: {summary(applies)}")
    if layers.network_namespaces and layers.root:
        enter_network_namespace()
        totals, applies = run(args.count, cases[-1][1])
        print(f"{'same, zygote inside its network namespace':52s} per child ms: {summary(totals)} "
              f"| apply alone ms: {summary(applies)}")


if __name__ == "__main__":
    main()
