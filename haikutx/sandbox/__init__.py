# -*- test-case-name: haikutx.test.test_sandbox -*-
"""
Kernel-enforced confinement of handler processes (SPEC 3.2): rlimits,
C{no_new_privs}, Landlock, seccomp-bpf, an unprivileged uid, and a network
namespace whose only way out is the server's egress proxy.

Standard library and ctypes only: the zygote imports this without Twisted.
In the zygote::

    layers = probe()
    sandbox = prepare(SandboxPolicy(limits=..., identity=identity_for(user, slot)))
    # per request:
    pid = os.fork()
    if pid == 0:
        sandbox.apply(keep_fds=(0, 1, 2, 3))
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

__all__ = [
    "EgressRelay",
    "Identity",
    "Layers",
    "PreparedSandbox",
    "ResourceLimits",
    "SandboxError",
    "SandboxPolicy",
    "enter_network_namespace",
    "identity_for",
    "interpreter_read_paths",
    "prepare",
    "probe",
    "receive_connection",
]
