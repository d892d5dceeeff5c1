# -*- test-case-name: haikutx.test.test_service -*-
"""
Composition of the haikutx services from a L{Config}.
"""

from __future__ import annotations

from twisted.application.service import MultiService

from haikutx.config import Config


def build_service(reactor, config: Config) -> MultiService:
    """
    Compose the services C{config} asks for.

    @param reactor: the reactor every service uses.
    @param config: the validated configuration.
    @return: a L{MultiService} whose children are named C{runtime}, C{pool},
        C{jobs} and C{gate} (the last two only when configured).
    """
    top = MultiService()
    if config.gates:
        from haikutx.gate import GateService

        GateService.from_config(reactor, config).setServiceParent(top)
    return top
