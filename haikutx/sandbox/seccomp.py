# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
A seccomp-bpf filter written as raw classic BPF, built once in the zygote by
L{build_filter} and installed in each forked child by L{install}.

The filter allows every system call except a deny list, which fails with
C{EPERM} (C{ENOSYS} for C{clone3}, so that the C library falls back to
C{clone}, whose flags the filter can read):

  - new processes: C{fork}, C{vfork}, and C{clone} without C{CLONE_THREAD}
    or with any C{CLONE_NEW*} flag (threads keep working), unless the
    filter is a zygote's (C{allow_fork}); then a Python child stacks the
    short filter of L{build_process_program}, which denies them again;
  - System V IPC and POSIX message queues (L{IPC});
  - C{execve}/C{execveat}, unless the policy allows exec (stdio
    interpreters; Landlock then decides what may be executed);
  - tracing and other processes' memory: C{ptrace}, C{process_vm_*},
    C{kcmp}, C{pidfd_getfd};
  - mounts and namespaces: C{mount}, C{umount2}, the new mount API,
    C{pivot_root}, C{chroot}, C{unshare}, C{setns};
  - servers: C{bind}, C{listen};
  - sockets other than IPv4 and IPv6 (so no unix, netlink or packet
    sockets); C{socketpair} only for C{AF_UNIX}/C{SOCK_STREAM} (asyncio's
    self-pipe), which can never be re-connected to a path;
  - the kernel keyring, C{kexec}, C{bpf}, C{perf_event_open},
    C{userfaultfd}, C{io_uring} (its operations bypass seccomp), module
    loading, C{open_by_handle_at} (which C{CAP_DAC_READ_SEARCH} would
    otherwise allow), C{personality}, C{reboot}, swap, accounting.

Calls from a foreign ABI (x32 on x86_64, or another audit architecture)
kill the process.

Why not a binding: PyPI's C{pyseccomp} is a ctypes wrapper over libseccomp,
which would do the same with a dependency and a shared library loaded into
the zygote; the filter above is small enough to write and test directly
(the tests check the system call table against libseccomp's own).
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass

from ._libc import MACHINE, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prctl

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7

#: System calls by architecture. aarch64 has no fork/vfork and the tables
#: differ; calls missing from a table are simply not filtered there.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "fork": 57, "vfork": 58, "clone": 56, "clone3": 435,
        "execve": 59, "execveat": 322,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "kcmp": 312, "pidfd_getfd": 438,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "unshare": 272, "setns": 308,
        "bind": 49, "listen": 50, "socket": 41, "socketpair": 53,
        "add_key": 248, "request_key": 249, "keyctl": 250,
        "kexec_load": 246, "kexec_file_load": 320,
        "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "name_to_handle_at": 303, "open_by_handle_at": 304,
        "init_module": 175, "finit_module": 313, "delete_module": 176,
        "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
        "personality": 135, "quotactl": 179, "iopl": 172, "ioperm": 173,
        "uselib": 134, "vhangup": 153,
        "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67,
        "semget": 64, "semop": 65, "semctl": 66, "semtimedop": 220,
        "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
        "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242,
        "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245,
    },
    "aarch64": {
        "clone": 220, "clone3": 435,
        "execve": 221, "execveat": 281,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "kcmp": 272, "pidfd_getfd": 438,
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "unshare": 97, "setns": 268,
        "bind": 200, "listen": 201, "socket": 198, "socketpair": 199,
        "add_key": 217, "request_key": 218, "keyctl": 219,
        "kexec_load": 104, "kexec_file_load": 294,
        "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "name_to_handle_at": 264, "open_by_handle_at": 265,
        "init_module": 105, "finit_module": 273, "delete_module": 106,
        "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89,
        "personality": 92, "quotactl": 60,
        "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182,
        "mq_timedreceive": 183, "mq_notify": 184, "mq_getsetattr": 185,
        "msgget": 186, "msgctl": 187, "msgrcv": 188, "msgsnd": 189,
        "semget": 190, "semctl": 191, "semtimedop": 192, "semop": 193,
        "shmget": 194, "shmctl": 195, "shmat": 196, "shmdt": 197,
    },
}

AUDIT_ARCH = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}

#: System V and POSIX message-queue IPC: objects that outlive a process and
#: are shared by every process of an IPC namespace (SPEC: no IPC between
#: handlers).  POSIX shared memory is a file in C{/dev/shm}, which Landlock
#: keeps out of reach.
IPC = (
    "shmget", "shmat", "shmctl", "shmdt",
    "semget", "semop", "semctl", "semtimedop",
    "msgget", "msgsnd", "msgrcv", "msgctl",
    "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr",
)

#: New processes (only threads are left).
FORK = ("fork", "vfork")

#: Denied outright (C{EPERM}).
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "unshare", "setns", "bind", "listen",
    "add_key", "request_key", "keyctl", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "name_to_handle_at", "open_by_handle_at",
    "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "personality", "quotactl",
    "iopl", "ioperm", "uselib", "vhangup",
)
EXEC = ("execve", "execveat")

CLONE_THREAD = 0x00010000
CLONE_NEW_ANY = (
    0x00000080  # CLONE_NEWTIME
    | 0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)
CLONE_NEWIPC = 0x08000000
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
SOCK_STREAM = 1
SOCK_TYPE_MASK = 0xF

# Classic BPF opcodes.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_AND_K = 0x54
_RET_K = 0x06

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

_OFF_NR = 0
_OFF_ARCH = 4


def _arg_low(n: int) -> int:
    # args[n] is a u64 at 16 + 8n; its low 32 bits come first (little endian).
    return 16 + 8 * n


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _Assembler:
    """
    Classic BPF with symbolic jump targets: a target is an instruction
    label, C{0} meaning "the next instruction".
    """

    def __init__(self) -> None:
        self.code: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: int, jt: object = 0, jf: object = 0) -> None:
        self.code.append((code, jt, jf, k))

    def assemble(self) -> list[tuple[int, int, int, int]]:
        out = []
        for index, (code, jt, jf, k) in enumerate(self.code):
            def resolve(target: object, index: int = index) -> int:
                if isinstance(target, int):
                    return target
                offset = self.labels[str(target)] - index - 1
                if not 0 <= offset <= 255:
                    raise ValueError(f"BPF jump to {target} out of range")
                return offset

            out.append((code, resolve(jt), resolve(jf), k))
        return out


def build_program(
    machine: str,
    allow_exec: bool = False,
    allow_fork: bool = False,
    allow_ipc_namespace: bool = False,
    deny_ipc: bool = True,
) -> list[tuple[int, int, int, int]]:
    """
    Assemble the filter for an architecture.

    @param machine: C{platform.machine()}, C{"x86_64"} or C{"aarch64"}.
    @param allow_exec: whether C{execve}/C{execveat} stay allowed.
    @param allow_fork: whether new processes may be started (C{fork},
        C{vfork}, C{clone} without C{CLONE_THREAD}; never with a
        C{CLONE_NEW*} flag).  The filter of a zygote and of every child,
        which a Python child narrows with L{build_process_program}.
    @param allow_ipc_namespace: allow C{unshare(CLONE_NEWIPC)} and nothing
        else of C{unshare} (the zygote gives each child an IPC namespace of
        its own; children lack the capability it needs).
    @param deny_ipc: deny the L{IPC} calls (C{False}: the IPC layer is
        turned off by name).
    @return: the instructions as C{(code, jt, jf, k)} tuples.
    @raise KeyError: for an architecture without a table.
    """
    table = SYSCALLS[machine]
    a = _Assembler()
    _check_arch(a, machine)
    denied = [n for n in DENIED + (IPC if deny_ipc else ()) if n in table]
    if allow_ipc_namespace:
        denied.remove("unshare")
    if not allow_fork:
        denied += [n for n in FORK if n in table]
    if not allow_exec:
        denied += EXEC
    for name in denied:
        a.op(_JEQ_K, table[name], "deny", 0)
    a.op(_JEQ_K, table["clone3"], "enosys", 0)
    a.op(_JEQ_K, table["clone"], "clone", 0)
    a.op(_JEQ_K, table["socket"], "socket", 0)
    a.op(_JEQ_K, table["socketpair"], "socketpair", 0)
    if allow_ipc_namespace:
        a.op(_JEQ_K, table["unshare"], "unshare", 0)
    a.op(_RET_K, RET_ALLOW)

    _clone_rule(a, allow_fork)

    a.label("socket")
    a.op(_LD_W_ABS, _arg_low(0))
    a.op(_JEQ_K, AF_INET, "allow", 0)
    a.op(_JEQ_K, AF_INET6, "allow", "deny")

    a.label("socketpair")
    a.op(_LD_W_ABS, _arg_low(0))
    a.op(_JEQ_K, AF_UNIX, 0, "deny")
    a.op(_LD_W_ABS, _arg_low(1))
    a.op(_AND_K, SOCK_TYPE_MASK)
    a.op(_JEQ_K, SOCK_STREAM, "allow", "deny")

    if allow_ipc_namespace:
        a.label("unshare")
        a.op(_LD_W_ABS, _arg_low(0))
        a.op(_JEQ_K, CLONE_NEWIPC, "allow", "deny")
    _returns(a)
    return a.assemble()


def build_process_program(
    machine: str, allow_exec: bool = False, allow_fork: bool = False
) -> list[tuple[int, int, int, int]]:
    """
    Assemble a short filter stacked on the one of L{build_program} when a
    child learns what it runs: it denies what the common filter allowed for
    the zygote's sake, new processes (unless C{allow_fork}), exec (unless
    C{allow_exec}), and C{unshare}/C{setns} entirely.

    @param machine: C{platform.machine()}.
    @param allow_exec: whether C{execve}/C{execveat} stay allowed.
    @param allow_fork: whether new processes may be started.
    @return: the instructions.
    @raise KeyError: for an architecture without a table.
    """
    table = SYSCALLS[machine]
    a = _Assembler()
    _check_arch(a, machine)
    denied = ["unshare", "setns"]
    if not allow_fork:
        denied += [n for n in FORK if n in table]
    if not allow_exec:
        denied += EXEC
    for name in denied:
        a.op(_JEQ_K, table[name], "deny", 0)
    if not allow_fork:
        a.op(_JEQ_K, table["clone3"], "enosys", 0)
        a.op(_JEQ_K, table["clone"], "clone", 0)
    a.op(_RET_K, RET_ALLOW)
    if not allow_fork:
        _clone_rule(a, False)
    _returns(a)
    return a.assemble()


def _check_arch(a: _Assembler, machine: str) -> None:
    a.op(_LD_W_ABS, _OFF_ARCH)
    a.op(_JEQ_K, AUDIT_ARCH[machine], 0, "kill")
    a.op(_LD_W_ABS, _OFF_NR)
    if machine == "x86_64":
        a.op(_JGE_K, 0x40000000, "kill", 0)  # the x32 ABI


def _clone_rule(a: _Assembler, allow_fork: bool) -> None:
    a.label("clone")
    a.op(_LD_W_ABS, _arg_low(0))
    if allow_fork:
        a.op(_JSET_K, CLONE_NEW_ANY, "deny", "allow")
    else:
        a.op(_JSET_K, CLONE_NEW_ANY, "deny", 0)
        a.op(_JSET_K, CLONE_THREAD, "allow", "deny")


def _returns(a: _Assembler) -> None:
    a.label("allow")
    a.op(_RET_K, RET_ALLOW)
    a.label("deny")
    a.op(_RET_K, RET_ERRNO | errno.EPERM)
    a.label("enosys")
    a.op(_RET_K, RET_ERRNO | errno.ENOSYS)
    a.label("kill")
    a.op(_RET_K, RET_KILL_PROCESS)


@dataclass(frozen=True, eq=False)
class Filter:
    """
    A seccomp filter ready to install: the program lives in memory owned by
    this object, prepared once and shared by every forked child.

    @ivar machine: the architecture it was built for.
    @ivar allow_exec: whether exec is allowed.
    @ivar length: the number of instructions.
    """

    machine: str
    allow_exec: bool
    length: int
    _buffer: ctypes.Array
    _prog: _SockFprog


def build_filter(
    allow_exec: bool = False,
    machine: str = MACHINE,
    allow_fork: bool = False,
    allow_ipc_namespace: bool = False,
    deny_ipc: bool = True,
) -> Filter:
    """
    Build the filter once (in the zygote).

    @param allow_exec: keep C{execve} allowed (stdio interpreters).
    @param machine: the architecture (default: this one).
    @param allow_fork: see L{build_program}.
    @param allow_ipc_namespace: see L{build_program}.
    @param deny_ipc: see L{build_program}.
    @return: a L{Filter} for L{install}.
    @raise KeyError: for an architecture without a table.
    """
    return _filter(
        machine,
        allow_exec,
        build_program(machine, allow_exec, allow_fork, allow_ipc_namespace, deny_ipc),
    )


def build_process_filter(
    allow_exec: bool = False, machine: str = MACHINE, allow_fork: bool = False
) -> Filter:
    """
    Build the short filter of L{build_process_program} once (in the zygote).
    """
    return _filter(machine, allow_exec, build_process_program(machine, allow_exec, allow_fork))


def _filter(machine: str, allow_exec: bool, program: list[tuple[int, int, int, int]]) -> Filter:
    buffer = (_SockFilter * len(program))(*[_SockFilter(c, t, f, k) for c, t, f, k in program])
    prog = _SockFprog(len(program), ctypes.cast(buffer, ctypes.POINTER(_SockFilter)))
    return Filter(machine, allow_exec, len(program), buffer, prog)


def install(program: Filter) -> None:
    """
    Install the filter on the calling thread (and its future threads and
    children). C{no_new_privs} must already be set.

    @raise OSError: if the kernel refuses.
    """
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(program._prog))
