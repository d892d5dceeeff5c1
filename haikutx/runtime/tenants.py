# -*- test-case-name: haikutx.test.test_scheduler -*-
"""
Handlers as tenants: the name a request is accounted and scheduled under,
a bounded table of them, and what each one was answered.

A handler's identity is what C{x-haiku-handler} names, without its query
string and fragment (and, for a URL, without credentials, with the scheme
and host in lower case).  At most L{MAX_TRACKED} handlers are tracked by
name; when the table is full, the least recently used handler with no
request running or waiting is forgotten (its counts move to L{OTHER}) to
make room, and when every tracked handler is busy, a new one is accounted
and scheduled as L{OTHER}, one bucket for all of them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict, deque
from typing import Any
from urllib.parse import urlsplit

from attrs import define, field
from zope.interface import implementer

from haikutx import metrics

#: The bucket of the handlers not tracked by name.
OTHER = "other"

#: Handlers tracked by name at most.
MAX_TRACKED = 1000

#: Longest handler identity tracked by name; a longer one is L{OTHER}.
MAX_NAME = 1024

_BOUNDS = metrics.DURATION_BUCKETS


def handler_identity(name: str) -> str:
    """
    The handler a C{x-haiku-handler} value names, for fairness and
    accounting.

    @param name: the parameter's value: a URL or a local name.
    @return: C{name} without query, fragment and credentials; L{OTHER} for
        a name longer than L{MAX_NAME}.
    """
    if ":" not in name and "?" not in name and "#" not in name:
        # A local name, as it is: the common case, made quick.
        return name if len(name) <= MAX_NAME else OTHER
    try:
        parts = urlsplit(name)
    except ValueError:
        parts = None
    if parts is not None and parts.scheme.lower() in ("http", "https") and parts.hostname:
        host = parts.hostname
        if ":" in host:
            host = f"[{host}]"
        try:
            port = parts.port
        except ValueError:
            port = None
        netloc = host if port is None else f"{host}:{port}"
        identity = f"{parts.scheme.lower()}://{netloc}{parts.path}"
    else:
        identity = name.split("#", 1)[0].split("?", 1)[0]
    return identity if len(identity) <= MAX_NAME else OTHER


@define(eq=False)
class Tenant:
    """
    One handler (or the L{OTHER} bucket): what runs and waits for it now,
    and what it was answered.

    @ivar name: its identity (L{handler_identity}) or L{OTHER}.
    @ivar running: requests holding a worker (or about to: granted one).
    @ivar waiting: requests waiting for their turn, oldest first
        (managed by L{haikutx.runtime.scheduler.Scheduler}).
    @ivar answers: requests answered, by status.
    @ivar durations: requests answered, by duration: one count per bound
        of L{metrics.DURATION_BUCKETS} (at most that long), then one for
        longer ones.
    @ivar duration_sum: seconds all the answered requests took.
    @ivar gone: requests whose client left before the answer.
    """

    name: str
    running: int = 0
    waiting: deque[Any] = field(factory=deque)
    answers: dict[int, int] = field(factory=dict)
    durations: list[int] = field(factory=lambda: [0] * (len(metrics.DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    gone: int = 0

    @property
    def idle(self) -> bool:
        """
        Whether no request of this handler runs or waits.
        """
        return not self.running and not self.waiting

    def counts(self) -> dict[str, int]:
        """
        The tenant's line in C{/_haiku/status}.
        """
        refused = self.answers.get(429, 0)
        errors = sum(count for status, count in self.answers.items() if status >= 500)
        return {
            "running": self.running,
            "waiting": len(self.waiting),
            "served": sum(self.answers.values()) - refused - errors,
            "refused": refused,
            "errors": errors,
            "gone": self.gone,
        }

    def absorb(self, other: Tenant) -> None:
        """
        Add C{other}'s counts to this tenant's.
        """
        for status, count in other.answers.items():
            self.answers[status] = self.answers.get(status, 0) + count
        for i, count in enumerate(other.durations):
            self.durations[i] += count
        self.duration_sum += other.duration_sum
        self.gone += other.gone


@implementer(metrics.IRequestCounts)
class Tenants:
    """
    The handlers known to one runtime, at most C{max_tracked} of them by
    name, and the L{OTHER} bucket.

    @param max_tracked: handlers tracked by name at most.
    @param collector: the L{metrics.RequestsCollector} that shows the
        counts (default L{metrics.REQUESTS}; C{None}: none).
    """

    def __init__(
        self, max_tracked: int = MAX_TRACKED, collector: Any = metrics.REQUESTS
    ) -> None:
        self._max_tracked = max_tracked
        self._named: OrderedDict[str, Tenant] = OrderedDict()
        self.other = Tenant(OTHER)
        if collector is not None:
            collector.add(self)

    def lookup(self, identity: str) -> Tenant:
        """
        The tenant C{identity} is accounted and scheduled as.

        @param identity: a L{handler_identity}.
        @return: its own L{Tenant}, or L{OTHER}'s when the table is full
            of busy handlers.
        """
        if identity == OTHER:
            return self.other
        tenant = self._named.get(identity)
        if tenant is not None:
            self._named.move_to_end(identity)
            return tenant
        if len(self._named) >= self._max_tracked and not self._evict_one():
            return self.other
        tenant = self._named[identity] = Tenant(identity)
        return tenant

    def _evict_one(self) -> bool:
        """
        Forget the least recently used idle handler, its counts moving to
        L{OTHER}.

        @return: whether one was forgotten.
        """
        name = next((name for name, t in self._named.items() if t.idle), None)
        if name is None:
            return False
        self.other.absorb(self._named.pop(name))
        return True

    def answered(self, tenant: Tenant, status: int | None, duration: float) -> None:
        """
        Count a request of C{tenant}, answered with C{status} after
        C{duration} seconds (C{None}: its client left before the answer).
        """
        if status is None:
            tenant.gone += 1
            return
        answers = tenant.answers
        answers[status] = answers.get(status, 0) + 1
        tenant.durations[bisect_left(_BOUNDS, duration)] += 1
        tenant.duration_sum += duration

    def __iter__(self) -> Any:
        yield from self._named.values()
        yield self.other

    def __len__(self) -> int:
        return len(self._named)

    def request_counts(self) -> Any:
        """
        Per handler (L{metrics.IRequestCounts}): name, answers by status,
        by duration bucket, and the sum of durations.
        """
        for tenant in self:
            if tenant.answers:
                yield tenant.name, tenant.answers, tenant.durations, tenant.duration_sum

    def status(self) -> dict[str, dict[str, int]]:
        """
        Per handler counts, for C{/_haiku/status}: every tracked handler
        and L{OTHER}.
        """
        return {tenant.name: tenant.counts() for tenant in self}
