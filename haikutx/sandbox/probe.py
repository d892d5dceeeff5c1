# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
Which sandbox layers this kernel offers, with a reason for each missing
one, for the start-up log and C{/_haiku/status}.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import landlock, seccomp
from ._libc import MACHINE, PR_GET_SECCOMP, libc


@dataclass(frozen=True)
class Layers:
    """
    The kernel's sandbox features.

    @ivar landlock_abi: the Landlock ABI (0: none).
    @ivar landlock_network: Landlock can deny TCP bind/connect (ABI 4+).
    @ivar landlock_scopes: Landlock scopes signals and abstract unix
        sockets (ABI 6+).
    @ivar seccomp: seccomp-bpf filters work here (and a system call table
        exists for this architecture).
    @ivar user_namespaces: unprivileged user namespaces are possible.
    @ivar network_namespaces: this process can create a network namespace.
    @ivar rlimits: resource limits (always: POSIX).
    @ivar root: running as root (so handlers can get their own uid).
    @ivar reasons: for each missing or partial layer, why.
    """

    landlock_abi: int
    landlock_network: bool
    landlock_scopes: bool
    seccomp: bool
    user_namespaces: bool
    network_namespaces: bool
    rlimits: bool
    root: bool
    reasons: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """
        A JSON-able form.
        """
        return {
            "landlock_abi": self.landlock_abi,
            "landlock_network": self.landlock_network,
            "landlock_scopes": self.landlock_scopes,
            "seccomp": self.seccomp,
            "user_namespaces": self.user_namespaces,
            "network_namespaces": self.network_namespaces,
            "rlimits": self.rlimits,
            "root": self.root,
            "missing": dict(self.reasons),
        }


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def probe() -> Layers:
    """
    Look at this kernel (cheap: a few system calls and C{/proc} reads; no
    process is started).

    @return: what is there, and why the rest is not.
    """
    reasons: dict[str, str] = {}
    abi = landlock.abi_version()
    if abi < 1:
        lsm = _read("/sys/kernel/security/lsm")
        reasons["landlock"] = (
            "Landlock is not enabled in this kernel"
            + (f" (active LSMs: {lsm})" if lsm else "")
            + ": reads are confined by file modes and the uid only"
        )
    else:
        if abi < 4:
            reasons["landlock_network"] = (
                f"Landlock ABI {abi} < 4: TCP bind is denied by seccomp only"
            )
        if abi < 6:
            reasons["landlock_scopes"] = (
                f"Landlock ABI {abi} < 6: signals and abstract unix sockets are "
                "confined by the uid switch and the network namespace only"
            )
    has_seccomp = libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0
    if not has_seccomp:
        reasons["seccomp"] = "this kernel has no seccomp (CONFIG_SECCOMP off)"
    elif MACHINE not in seccomp.SYSCALLS:
        has_seccomp = False
        reasons["seccomp"] = f"no system call table for {MACHINE}"
    root = os.geteuid() == 0
    max_userns = _read("/proc/sys/user/max_user_namespaces")
    userns_clone = _read("/proc/sys/kernel/unprivileged_userns_clone")
    apparmor_userns = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    user_ns = max_userns not in (None, "0") and userns_clone != "0" and apparmor_userns != "1"
    if not user_ns:
        reasons["user_namespaces"] = (
            "unprivileged user namespaces are disabled "
            f"(max_user_namespaces={max_userns}, unprivileged_userns_clone={userns_clone}, "
            f"apparmor_restrict_unprivileged_userns={apparmor_userns})"
        )
    net_ns = os.path.exists("/proc/self/ns/net") and (root or user_ns)
    if not net_ns:
        reasons["network_namespaces"] = (
            "cannot create a network namespace (not root and no user namespaces): "
            "handlers can reach loopback and private addresses"
        )
    if not root:
        reasons["uid"] = (
            "not started as root: handlers run as this uid, RLIMIT_NPROC is not per slot"
        )
    return Layers(
        landlock_abi=abi,
        landlock_network=abi >= 4,
        landlock_scopes=abi >= 6,
        seccomp=has_seccomp,
        user_namespaces=user_ns,
        network_namespaces=net_ns,
        rlimits=True,
        root=root,
        reasons=reasons,
    )
