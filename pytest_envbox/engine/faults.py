"""Faults on purpose: an environment's ``Network`` (partitions) and a service's ``Link`` (down,
delay, loss), for testing how the other services cope. Both are requests to the supervisor, which
applies them on the environment's side of each link, where a service cannot undo them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING

from pytest_envbox.engine.client import SupervisorClient, SupervisorError
from pytest_envbox.errors import EnvboxError, HostUnsupported
from pytest_envbox.supervisor.protocol import HealRequest, LinkRequest, PartitionRequest

if TYPE_CHECKING:
    from pytest_envbox.engine.handle import ServiceHandle

__all__ = ["Link", "Network"]


class Network:
    """An environment's private network (``env.network``): partitions between groups of services.

    ``partition(["api"], ["cache", "db"])`` drops every packet between a service of the first
    group and one of the second, both ways, until ``heal()``; other traffic, and the test's own
    through published ports, is untouched. Partitions add up: each call cuts more pairs.
    """

    def __init__(self, env_id: str, subnet: str, services: Callable[[], Collection[str]],
                 supervisor: Callable[[], SupervisorClient | None]) -> None:  # fmt: skip
        """Made by its :class:`~pytest_envbox.Environment`: ``services`` and ``supervisor`` say
        what the environment has now (names of its services; its supervisor, once open)."""
        self._env_id = env_id
        self._subnet = subnet
        self._services = services
        self._supervisor = supervisor

    def __repr__(self) -> str:
        return f"<Network of {self._env_id}: {self._subnet}>"

    @property
    def subnet(self) -> str:
        return self._subnet

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
