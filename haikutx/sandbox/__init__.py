# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
Kernel-enforced confinement of handler processes (SPEC 3.2): rlimits,
C{no_new_privs}, Landlock, seccomp-bpf, an unprivileged uid, and a network
namespace whose only way out is the server's egress proxy.

Standard library and ctypes only: the zygote imports this without Twisted.
In a zygote (see L{slot} for where each layer is applied and why)::

    sandbox = prepare_slot(SandboxPolicy(limits=..., identity=identity_for(user, slot)))
    sandbox.enter_ipc_namespace()
    sandbox.enter_zygote()          # common layers, once; no ruleset fd left
    # per child:
    sandbox.new_ipc_namespace()
    pid = os.fork()
    if pid == 0:
        sandbox.enter_child(keep_fds=(0, 1, 2, 3), parent_death_signal=9)
        ...wait for the first request...
        sandbox.confine_python()    # or confine_stdio()
        ...run the handler...

See C{doc/sandbox.md}.
"""

from .netns import EgressRelay, enter_network_namespace, receive_connection
from .policy import (
    PreparedSandbox,
    SandboxError,
    SandboxPolicy,
    identity_for,
    interpreter_read_paths,
    prepare,
)
from .privileges import Identity, ResourceLimits
from .probe import Layers, probe
from .slot import LAYERS, SlotSandbox, prepare_slot

__all__ = [
    "EgressRelay",
    "Identity",
    "LAYERS",
    "Layers",
    "PreparedSandbox",
    "ResourceLimits",
    "SandboxError",
    "SandboxPolicy",
    "SlotSandbox",
    "enter_network_namespace",
    "identity_for",
    "interpreter_read_paths",
    "prepare",
    "prepare_slot",
    "probe",
    "receive_connection",
]
