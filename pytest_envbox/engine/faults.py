"""An environment's ``Network`` (its subnet, how the test reaches it, partitions) and a service's
``Link`` (down, delay, loss): faults on purpose, for testing how the other services cope. Faults
are requests to the supervisor, which applies them on the environment's side of each link, where
a service cannot undo them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING

from pytest_envbox.engine import reach
from pytest_envbox.engine.client import SupervisorClient, SupervisorError
from pytest_envbox.errors import EnvboxError, HostUnsupported
from pytest_envbox.supervisor.protocol import (
    HealRequest,
    LinkRequest,
    NetworkReply,
    NetworkRequest,
    PartitionRequest,
)

if TYPE_CHECKING:
    from pytest_envbox.engine.handle import ServiceHandle

__all__ = ["Link", "Network"]


class Network:
    """An environment's private network (``env.network``): its subnet, whether the test reaches
    its services' addresses directly, and partitions between groups of services.

    ``partition(["api"], ["cache", "db"])`` drops every packet between a service of the first
    group and one of the second, both ways, until ``heal()``; other traffic, and the test's own,
    is untouched. Partitions add up: each call cuts more pairs.
    """

    def __init__(self, env_id: str, subnet: str | None, services: Callable[[], Collection[str]],
                 supervisor: Callable[[], SupervisorClient | None]) -> None:  # fmt: skip
        """Made by its :class:`~pytest_envbox.Environment`: ``subnet`` as configured (None: one
        of the host's free ones); ``services`` and ``supervisor`` say what the environment has
        now (names of its services; its supervisor, once open)."""
        self._env_id = env_id
        self._wanted = subnet
        self._services = services
        self._supervisor = supervisor
        self._bound: NetworkReply | None = None
        self._lender: reach.Lender | None = None

    def __repr__(self) -> str:
        where = self._bound.subnet if self._bound is not None else self._wanted or "not open"
        return f"<Network of {self._env_id}: {where}>"

    def bind(self, sup: SupervisorClient) -> str:
        """Have the supervisor give the environment its network; its subnet (once per
        environment: its services' addresses follow from it)."""
        if self._bound is None:
            self._bound = sup.call(NetworkRequest(self._env_id, self._wanted))
        return self._bound.subnet

    def release(self) -> None:
        """The environment closes: sockets lent to it go, and its network if no service was on it
        (releasing its services' slots frees it otherwise: no request more)."""
        if self._lender is not None:
            self._lender.close()
        sup = self._supervisor()
        if self._bound is not None and sup is not None and not self._services():
            with contextlib.suppress(EnvboxError, OSError):
                sup.call(NetworkRequest(self._env_id, None, drop=True))

    def _info(self) -> NetworkReply:
        sup = self._supervisor()
        if self._bound is None and sup is not None:
            self.bind(sup)
        if self._bound is None:
            raise EnvboxError("env.network: the environment's subnet is chosen when it opens; "
                              "open it first (with Environment(...) as env, or the envbox fixture)")
        return self._bound

    @property
    def subnet(self) -> str:
        """The environment's subnet: the configured one, else a /24 of 198.18.0.0/15 that no
        other live environment on this host has (chosen when the environment opens)."""
        if self._bound is None and self._wanted is not None and self._supervisor() is None:
            return self._wanted
        return self._info().subnet

    @property
    def routed(self) -> bool:
        """Whether the host routes the subnet to the environment: the test (any program on the
        host) then connects to ``handle.ip`` directly. See :attr:`why_unrouted` when not."""
        return self._info().routed

    @property
    def why_unrouted(self) -> str | None:
        """Why the subnet is not routed from the host (None when it is): rootless mode, or a
        subnet that another environment or the host's own routes already have."""
        return self._info().why

    @contextlib.contextmanager
    def reachable(self) -> Iterator[None]:
        """Within it, Python clients of the test process reach service addresses even where the
        subnet is not routed (rootless mode): a socket connecting to an address of the subnet
        is made inside the environment's network first (see engine/reach.py for the limits).
        Nothing to do, and nothing done, when :attr:`routed`.

        Example::

            with env.network.reachable():
                master = redis.Sentinel([(env["sentinel"].ip, 26379)]).master_for("mymaster")
                master.set("k", "v")
        """
        info = self._info()
        sup = self._supervisor()
        if info.routed or sup is None:
            yield
            return
        if self._lender is None:
            self._lender = reach.Lender(sup, self._env_id)
        with reach.reachable(info.subnet, self._lender):
            yield

    def partition(self, group_a: Iterable[str | ServiceHandle],
                  group_b: Iterable[str | ServiceHandle]) -> None:  # fmt: skip
        """Cut all traffic between the services of ``group_a`` and those of ``group_b``."""
        a, b = self._names(group_a), self._names(group_b)
        both = set(a) & set(b)
        if both:
            raise ValueError(f"network.partition(): {sorted(both)} in both groups; a service "
                             "cannot be cut off from itself")  # fmt: skip
        self._call(PartitionRequest(self._env_id, a, b))

    def heal(self) -> None:
        """Undo every partition."""
        self._call(HealRequest(self._env_id))

    def _names(self, group: Iterable[str | ServiceHandle]) -> list[str]:
        if isinstance(group, str):
            group = [group]  # one name, not its letters
        names = [g if isinstance(g, str) else g.name for g in group]
        present = self._services()
        for n in names:
            if n not in present:
                known = ", ".join(sorted(present)) or "none"
                raise KeyError(f"network.partition(): no service {n!r} in this environment; it "
                               f"has: {known}")  # fmt: skip
        if not names:
            raise ValueError("network.partition(): each group needs at least one service")
        return names

    def _call(self, request: PartitionRequest | HealRequest) -> None:
        sup = self._supervisor()
        if sup is None:
            if isinstance(request, HealRequest):
                return
            raise EnvboxError("network.partition(): the environment is not open")
        try:
            sup.call(request)
        except SupervisorError as e:
            raise EnvboxError(f"network.{request.TAG}() failed: {e}") from None


class Link:
    """Faults on one service's network link (``handle.link``), for testing how others cope.

    Applied on the environment's side of the service's veth pair, so they hit its traffic with
    other services and with the test through a published port alike, and the service cannot undo
    them. What each affects:

    - ``down()`` / ``up()``: the link itself; nothing reaches the service or leaves it.
    - ``delay(ms, jitter_ms=0)``: packets *to* the service wait ``ms`` (netem); a round trip
      through it grows by ``ms``. Needs the kernel's ``sch_netem``; ``HostUnsupported`` otherwise.
    - ``loss(percent)``: that share of packets is dropped at random, in each direction on its
      own (a drop rule on the environment's bridge, nf_tables).
    - ``clear()``: no delay, no loss, link up.
    """

    def __init__(self, sup: SupervisorClient, slot: str, name: str) -> None:
        """Made by :attr:`ServiceHandle.link <pytest_envbox.ServiceHandle.link>`."""
        self._sup = sup
        self._slot = slot
        self._name = name

    def __repr__(self) -> str:
        return f"<Link of {self._name!r}>"

    def down(self) -> None:
        """Cut the service's link: connections to and from it fail until ``up()``."""
        self._do(LinkRequest(self._slot, "down"))

    def up(self) -> None:
        self._do(LinkRequest(self._slot, "up"))

    def delay(self, ms: float, jitter_ms: float = 0) -> None:
        """Delay packets to the service by ``ms`` milliseconds (plus or minus ``jitter_ms``)."""
        for key, v in (("ms", ms), ("jitter_ms", jitter_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"link.delay(): {key} must be a number of milliseconds >= 0, "
                                 f"not {v!r}")  # fmt: skip
        self._do(LinkRequest(self._slot, "delay", delay_ms=float(ms), jitter_ms=float(jitter_ms)))

    def loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets crossing the link, each way, at random.

        ``loss(100)`` drops everything (connections fail, the link stays up); ``loss(0)`` none.
        """
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError(f"link.loss(): percent must be a number from 0 to 100, not {percent!r}")
        self._do(LinkRequest(self._slot, "loss", percent=round(percent)))

    def clear(self) -> None:
        """Remove every fault from the link: no delay, no loss, link up."""
        self._do(LinkRequest(self._slot, "clear"))

    def _do(self, request: LinkRequest) -> None:
        try:
            self._sup.call(request)
        except HostUnsupported as e:
            raise HostUnsupported(f"service {self._name!r}: {e}") from None
        except SupervisorError as e:
            raise EnvboxError(f"service {self._name!r}: link.{request.action}() failed: {e}") from None
