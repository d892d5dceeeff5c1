# -*- test-case-name: haikutx.test.test_isolation -*-
"""
The sandbox of one worker slot, applied in three places so that no
descriptor of a shared kernel object ever reaches a handler (SPEC 3.2):

  1. on the zygote itself, once, before its first fork
     (L{SlotSandbox.enter_zygote}): an IPC namespace, C{no_new_privs}, the
     Landlock domain common to all its children (reads beneath the
     interpreter's paths, execution of the stdio interpreters, no writes),
     and the seccomp filter common to all children.  The ruleset's
     descriptor is closed right away: children inherit the I{domain},
     which nobody can widen, not the ruleset, which anybody holding it
     could;
  2. in each child right after C{fork}, by zygote code, before the child
     reads anything (L{SlotSandbox.enter_child}): an IPC namespace of its
     own (made by the zygote before the fork, L{SlotSandbox.new_ipc_namespace}),
     descriptors, rlimits, the uid switch, the parent-death signal;
  3. when the child learns what it runs (L{SlotSandbox.confine_python},
     L{SlotSandbox.confine_stdio}): a Landlock domain of its own, made and
     dropped in the child (scoped: no signal out of it; for Python, no
     exec), and for Python a short seccomp filter with no new processes
     and no exec.  A stdio interpreter gets its own short filter before
     C{exec} (L{SlotSandbox.confine_interpreter}).

Applying the common layers once in the zygote also makes each child
cheaper: a child installs a short filter instead of the whole one and
attaches no Landlock rules.

Standard library and ctypes only (the zygote imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import landlock, privileges, seccomp
from ._libc import CLONE_NEWIPC, PR_SET_PDEATHSIG, close_fds_except, prctl, unshare
from .policy import PreparedSandbox, SandboxError, SandboxPolicy, prepare

#: The layers that can be turned off by name (besides all of them).
LAYERS = ("landlock", "seccomp", "uid", "ipc", "network", "processes")


@dataclass
class SlotSandbox:
    """
    A slot's sandbox, prepared in the zygote by L{prepare_slot}.

    @ivar common: the prepared sandbox of the layers common to every child
        (its policy is the union of the Python and stdio ones).
    @ivar python_filter: the short seccomp filter of a Python child.
    @ivar interpreter_filter: the short seccomp filter of a stdio
        interpreter process, installed before C{exec}.
    @ivar landlock_abi: the Landlock ABI (0: none).
    @ivar ipc: how IPC is confined, for the report.
    @ivar ipc_per_child: whether each child gets an IPC namespace of its own.
    """

    common: PreparedSandbox
    python_filter: seccomp.Filter | None
    interpreter_filter: seccomp.Filter | None
    landlock_abi: int
    ipc: str = "not entered"
    ipc_per_child: bool = False
    _zygote_entered: bool = False
    #: The Landlock layers of a child's own (made once, here).
    _python_domain: landlock.OwnDomain | None = None
    _stdio_domain: landlock.OwnDomain | None = None

    def __post_init__(self) -> None:
        if self.landlock_abi:
            self._python_domain = landlock.OwnDomain(self.landlock_abi, deny_exec=True)
            self._stdio_domain = landlock.OwnDomain(self.landlock_abi, deny_exec=False)

    # In the zygote

    def enter_ipc_namespace(self, per_child: bool = True) -> str:
        """
        Move the zygote into an IPC namespace of its own (System V objects
        and POSIX message queues are per IPC namespace), and remember to
        give each child one of its own too.  Call before L{enter_zygote}.

        @return: how IPC stands, for the start-up report.
        """
        try:
            unshare(CLONE_NEWIPC)
        except OSError as e:
            self.ipc = (
                f"System V and POSIX IPC refused by seccomp; no IPC namespace ({e})"
                if self.common.filter is not None
                else f"unconfined: no seccomp and no IPC namespace ({e})"
            )
            return self.ipc
        self.ipc_per_child = per_child
        where = "each child" if per_child else "each slot"
        refused = "refused by seccomp, and " if self.common.filter is not None else ""
        self.ipc = f"active: System V and POSIX IPC {refused}an IPC namespace for {where}"
        return self.ipc

    def enter_zygote(self) -> None:
        """
        Apply the layers common to all children to the zygote itself, once:
        C{no_new_privs}, the Landlock domain, the seccomp filter, and what
        their switch of identity would repeat (the emptied capability
        bounding set, no supplementary groups, C{keep_caps}:
        L{privileges.prepare_children}); children then only switch their
        ids.  The ruleset descriptor is closed here.

        @raise SandboxError: if a layer fails to apply (the zygote must exit).
        """
        self.common.apply_to_zygote()
        if self.common._identity is not None:
            try:
                privileges.prepare_children(self.common._identity)
            except OSError as e:
                raise SandboxError(f"sandbox: {e}") from e
        self._zygote_entered = True

    def new_ipc_namespace(self) -> None:
        """
        In the zygote, just before a fork: a fresh IPC namespace that the
        next child alone will use (the previous one goes with the previous
        child).
        """
        if self.ipc_per_child:
            unshare(CLONE_NEWIPC)

    # In a child

    def enter_child(self, keep_fds: tuple[int, ...], parent_death_signal: int) -> None:
        """
        Right after C{fork}, before the child reads anything: close every
        descriptor but C{keep_fds}, set the rlimits, switch to the slot's
        uid, set the parent-death signal (again: the uid switch clears it).

        @raise SandboxError: if a step fails (the child must C{os._exit}).
        """
        if not self._zygote_entered:
            raise SandboxError("the zygote's layers were not applied")
        common = self.common
        try:
            close_fds_except(keep_fds)
            privileges.apply_limits(common._limits)
            if common._identity is not None:
                privileges.switch_identity(common._identity, zygote_prepared=True)
            prctl(PR_SET_PDEATHSIG, parent_death_signal)
        except OSError as e:
            raise SandboxError(f"sandbox: {e}") from e

    def confine_python(self) -> None:
        """
        Before the first Python handler runs in this child: a Landlock
        domain of its own with no exec, and the short filter with no new
        processes and no exec.

        @raise SandboxError: if a layer fails.
        """
        try:
            if self._python_domain is not None:
                self._python_domain.enter()
            if self.python_filter is not None:
                seccomp.install(self.python_filter)
        except OSError as e:
            raise SandboxError(f"sandbox: {e}") from e

    def confine_stdio(self) -> None:
        """
        Before the first stdio handler runs in this child (the child runs
        no handler code itself; it starts interpreters): a Landlock domain
        of its own, so that neither it nor its interpreters can signal
        beyond it.

        @raise SandboxError: if a layer fails.
        """
        try:
            if self._stdio_domain is not None:
                self._stdio_domain.enter()
        except OSError as e:
            raise SandboxError(f"sandbox: {e}") from e

    def confine_interpreter(self) -> None:
        """
        In a stdio interpreter's process, before C{exec}: its short filter.

        @raise SandboxError: if it fails.
        """
        try:
            if self.interpreter_filter is not None:
                seccomp.install(self.interpreter_filter)
        except OSError as e:
            raise SandboxError(f"sandbox: {e}") from e

    def describe(self) -> dict[str, object]:
        """
        A JSON-able summary for start-up logs and C{/_haiku/status}.
        """
        out = self.common.describe()
        layers = out["layers"]
        assert isinstance(layers, dict)
        layers["ipc"] = self.ipc
        out["applied"] = {
            "zygote": "no_new_privs, Landlock (common domain), seccomp (common filter), "
            "IPC namespace",
            "child": "rlimits, uid, IPC namespace, own Landlock domain, "
            "seccomp (python: no processes, no exec)",
        }
        return out


def prepare_slot(
    policy: SandboxPolicy,
    exec_paths: tuple[str, ...] = (),
    exec_read_paths: tuple[str, ...] = (),
    off: tuple[str, ...] = (),
) -> SlotSandbox:
    """
    Prepare a slot's sandbox in its zygote.

    @param policy: the Python handlers' policy (limits, identity, ports).
    @param exec_paths: the stdio interpreters, which stdio handlers may
        execute (nothing when empty).
    @param exec_read_paths: what those interpreters read besides.
    @param off: layers turned off by name (L{LAYERS}); a layer turned off
        says so in the report.
    @return: the prepared slot sandbox.
    @raise SandboxError: as L{prepare}.
    """
    import dataclasses

    common_policy = dataclasses.replace(
        policy,
        allow_exec=bool(exec_paths),
        exec_paths=tuple(exec_paths),
        extra_read_paths=tuple(policy.extra_read_paths) + tuple(exec_read_paths),
        identity=None if "uid" in off else policy.identity,
    )
    common = prepare(
        common_policy,
        allow_fork=True,
        allow_ipc_namespace="ipc" not in off,
        deny_ipc="ipc" not in off,
        landlock="landlock" not in off,
        seccomp_filter="seccomp" not in off,
    )
    for name in ("landlock", "seccomp", "uid"):
        if name in off:
            common.layers[name] = "turned off by name"
    use_seccomp = common.filter is not None
    return SlotSandbox(
        common=common,
        python_filter=seccomp.build_process_filter(False) if use_seccomp else None,
        # A stdio interpreter may start processes (a shell script is made of
        # commands); the server's cgroup bounds them (haikutx.sandbox.cgroup).
        interpreter_filter=(
            seccomp.build_process_filter(True, allow_fork=True) if use_seccomp else None
        ),
        landlock_abi=common.ruleset.abi if common.ruleset is not None else 0,
    )
