"""The supervisor's protocol: every message a frozen dataclass, and their one codec.

A request names its reply's type (``Request[ReplyT]``), so that the client's
``call(StartRequest(...))`` is a ``StartReply`` to the type checker
(:meth:`~pytest_envbox.engine.client.SupervisorClient.call`). Every message crosses the
socket as one frame: a 4-byte big-endian length, then a JSON object with the message's type
tag (``t``), its request id (``id``; none on events) and its fields. Nested values (the
sandbox plan, limits, the network wiring) are JSON objects; :func:`decode` turns them back
into their types, and the int keys of published ports back into ints.

JSON rather than pickle: the two ends are the same package, but nothing that crosses a process
boundary should be able to execute code when decoded.

Imported by the supervisor's lean interpreter (``python -S``): the standard library only.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pytest_envbox.sandbox.plan import SandboxPlan

__all__ = [
    "MAX_FRAME", "MESSAGE_TYPES", "CensusReply", "CensusRequest", "CgroupLimits", "Done",
    "ErrorReply", "Event", "ExecReply", "ExecRequest", "ExitedEvent", "FrameReader",
    "FreezeRequest", "Handlers", "HealRequest", "HelloReply", "HelloRequest", "KeepRequest",
    "LinkRequest", "Message", "NetWiring", "OwnDirRequest", "PartitionRequest", "PrepareRequest",
    "ProtocolError", "ReleaseRequest", "Reply", "ReplyT", "Request", "ShutdownReply", "ShutdownRequest",
    "SignalRequest", "StartReply", "StartRequest", "StatsReply", "StatsRequest", "SupervisorDied",
    "TcpCheckReply", "TcpCheckRequest", "Unsupported", "decode", "encode", "recv_messages",
]  # fmt: skip

_HEADER = struct.Struct(">I")
#: The largest frame either end accepts (its JSON, not counting the 4-byte header).
MAX_FRAME = 64 << 20


class ProtocolError(ValueError):
    """A frame that is not a message of this protocol (too large, an unknown type tag...)."""


class Unsupported(Exception):
    """This host cannot do what was asked; the message says why and how to enable it.

    Raised in the supervisor; crosses the socket as ``ErrorReply(kind="unsupported")`` and is
    raised in the test process as :class:`~pytest_envbox.errors.HostUnsupported`.
    """


# --- the kinds of message --------------------------------------------------------------------


class Message:
    """Base of every message; ``TAG`` names its type on the wire."""

    __slots__ = ()
    TAG: ClassVar[str]


class Reply(Message):
    """The answer to one request."""

    __slots__ = ()


ReplyT = TypeVar("ReplyT", bound=Reply, covariant=True)


class Request(Message, Generic[ReplyT]):
    """A request whose reply is a ``ReplyT`` (or an :class:`ErrorReply`)."""

    __slots__ = ()


class Event(Message):
    """Something that happened to a slot's service, unasked."""

    __slots__ = ()
    slot: str


# --- values carried inside messages ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    """A service's cgroup limits: ``memory`` in bytes, ``cpu`` in cores, ``pids`` a count; None
    is unlimited."""

    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None

    def any(self) -> bool:
        return self.memory is not None or self.cpu is not None or self.pids is not None

    def as_dict(self) -> dict[str, int | float | None]:
        """As the keyword arguments of ``cgroups.ServiceCgroup.set_limits`` (and as errors show them)."""
        return {"memory": self.memory, "cpu": self.cpu, "pids": self.pids}


@dataclass(frozen=True, slots=True)
class NetWiring:
    """A service's place on its environment's network: its address, the subnet's prefix length
    and the hub's address (the gateway, through which published ports reach the service)."""

    ip: str
    prefix: int
    gateway: str


# --- requests and their replies ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done(Reply):
    """The request was carried out; there is nothing to say."""

    TAG: ClassVar[str] = "done"


@dataclass(frozen=True, slots=True)
class ErrorReply(Reply):
    """The request failed. ``kind``: ``unsupported`` (the host lacks something: the message says
    what and how to get it) or ``failed`` (refused, or failed on the way)."""

    TAG: ClassVar[str] = "error"
    kind: Literal["unsupported", "failed"]
    message: str


@dataclass(frozen=True, slots=True)
class HelloReply(Reply):
    """The supervisor's pid, why its cgroups are unusable (None: they are usable), and the id
    maps of its user namespace as ``(first id inside, count)`` ranges."""

    TAG: ClassVar[str] = "hello_reply"
    pid: int
    cgroup_problem: str | None
    uid_map: list[tuple[int, int]]
    gid_map: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class HelloRequest(Request[HelloReply]):
    """The first request: also tear down when any of ``watch`` (pids) dies."""

    TAG: ClassVar[str] = "hello"
    watch: list[int]


@dataclass(frozen=True, slots=True)
class StartReply(Reply):
    """The service's command was exec'd: its host pid (None if it is gone already) and every
    published port (inside) -> its port on the host."""

    TAG: ClassVar[str] = "start_reply"
    pid: int | None
    ports: dict[int, int]


@dataclass(frozen=True, slots=True)
class StartRequest(Request[StartReply]):
    """Start a service in ``slot`` (``<environment id>/<service>``), its output appended to
    ``log_path``. ``generation`` numbers the slot's starts (its exit event carries it); ``net``
    is None for a service without a network."""

    TAG: ClassVar[str] = "start"
    slot: str
    plan: SandboxPlan
    log_path: str
    ports: list[int]
    generation: int
    limits: CgroupLimits
    net: NetWiring | None


@dataclass(frozen=True, slots=True)
class SignalRequest(Request[Done]):
    """Signal the service (``main``, through its pidfd) or its sandbox's init; ``thaw`` resumes a
    paused service first (SIGKILL always does)."""

    TAG: ClassVar[str] = "signal"
    slot: str
    sig: int
    target: Literal["main", "init"]
    thaw: bool = False


@dataclass(frozen=True, slots=True)
class TcpCheckReply(Reply):
    """Whether the port accepted a connection."""

    TAG: ClassVar[str] = "tcp_check_reply"
    ok: bool


@dataclass(frozen=True, slots=True)
class TcpCheckRequest(Request[TcpCheckReply]):
    """Does ``port`` accept a connection inside the service's network namespace?"""

    TAG: ClassVar[str] = "tcp_check"
    slot: str
    port: int


@dataclass(frozen=True, slots=True)
class ExecReply(Reply):
    """The command's exit code and output; ``exec_error`` says why it could not be run."""

    TAG: ClassVar[str] = "exec_reply"
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    exec_error: str | None


@dataclass(frozen=True, slots=True)
class ExecRequest(Request[ExecReply]):
    """Run ``argv`` inside the running service of ``slot``, as ``plan`` says (its user, env...)."""

    TAG: ClassVar[str] = "exec"
    slot: str
    plan: SandboxPlan
    argv: list[str]
    input: str | None
    timeout: float | None


@dataclass(frozen=True, slots=True)
class ReleaseRequest(Request[Done]):
    """Free the slots (killing what still runs there); forget ``disown``, a directory the
    supervisor was to delete if the test process died."""

    TAG: ClassVar[str] = "release"
    slots: list[str]
    disown: str | None = None


@dataclass(frozen=True, slots=True)
class LinkRequest(Request[Done]):
    """A fault on the service's link: ``down``, ``up``, ``delay`` (``delay_ms``, ``jitter_ms``),
    ``loss`` (``percent``) or ``clear``."""

    TAG: ClassVar[str] = "link"
    slot: str
    action: Literal["down", "up", "delay", "loss", "clear"]
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    percent: int = 0


@dataclass(frozen=True, slots=True)
class PartitionRequest(Request[Done]):
    """Drop all traffic between services (names) of group ``a`` and those of group ``b``."""

    TAG: ClassVar[str] = "partition"
    env: str
    a: list[str]
    b: list[str]


@dataclass(frozen=True, slots=True)
class HealRequest(Request[Done]):
    """Undo every partition of environment ``env``."""

    TAG: ClassVar[str] = "heal"
    env: str


@dataclass(frozen=True, slots=True)
class StatsReply(Reply):
    """The current run's figures, from its cgroup."""

    TAG: ClassVar[str] = "stats_reply"
    memory_bytes: int
    memory_peak_bytes: int
    cpu_seconds: float
    pids: int
    oom_kills: int


@dataclass(frozen=True, slots=True)
class StatsRequest(Request[StatsReply]):
    """The figures of the slot's current run."""

    TAG: ClassVar[str] = "stats"
    slot: str


@dataclass(frozen=True, slots=True)
class FreezeRequest(Request[Done]):
    """Pause (``frozen``) or resume every process of the service."""

    TAG: ClassVar[str] = "freeze"
    slot: str
    frozen: bool


@dataclass(frozen=True, slots=True)
class PrepareRequest(Request[Done]):
    """Prepare ``count`` sandboxes at once: a level of that many services follows."""

    TAG: ClassVar[str] = "prepare"
    count: int


@dataclass(frozen=True, slots=True)
class CensusReply(Reply):
    """What the supervisor holds: its slots, its environments' hubs (and the inode of each one's
    network namespace), prepared spares, and hubs ready for the next environments."""

    TAG: ClassVar[str] = "census_reply"
    slots: list[str]
    hubs: list[str]
    spares: int
    hub_netns: dict[str, int]
    spare_hubs: int


@dataclass(frozen=True, slots=True)
class CensusRequest(Request[CensusReply]):
    """What the supervisor holds (for ``envbox ps`` and the teardown tests)."""

    TAG: ClassVar[str] = "census"


@dataclass(frozen=True, slots=True)
class OwnDirRequest(Request[Done]):
    """Delete directory ``path`` if the test process dies before it can (``own``), or not."""

    TAG: ClassVar[str] = "own_dir"
    path: str
    own: bool


@dataclass(frozen=True, slots=True)
class ShutdownReply(Reply):
    """The environments kept running (``--envbox-keep``): the supervisor lives on for them."""

    TAG: ClassVar[str] = "shutdown_reply"
    kept: list[str]


@dataclass(frozen=True, slots=True)
class ShutdownRequest(Request[ShutdownReply]):
    """Tear everything down and exit, or detach with the environments to keep."""

    TAG: ClassVar[str] = "shutdown"


@dataclass(frozen=True, slots=True)
class KeepRequest(Request[Done]):
    """Keep environment ``env`` running after the test process ends; ``why`` is shown by
    ``envbox ps``."""

    TAG: ClassVar[str] = "keep"
    env: str
    why: str


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExitedEvent(Event):
    """The run ``generation`` of the slot's service has ended (its whole sandbox is gone).

    ``killed``: by a SIGKILL of ours (stop, kill), so a 137 is no OOM kill. The figures are the
    run's totals from its cgroup (None without one).
    """

    TAG: ClassVar[str] = "exited"
    slot: str
    generation: int
    returncode: int
    killed: bool
    oom_kills: int
    memory_peak_bytes: int | None
    cpu_seconds: float | None


@dataclass(frozen=True, slots=True)
class SupervisorDied(Event):
    """The supervisor is gone, and the slot's service with it (made by the client, at EOF)."""

    TAG: ClassVar[str] = "supervisor_died"
    slot: str


#: A concern's request handlers: each takes the request's id and the request, and returns the
#: reply, or None when the reply comes later (a start, an exec).
Handlers = dict[type[Message], Callable[[int, Any], Reply | None]]


# --- the codec --------------------------------------------------------------------------------

#: Every message type, each with its own ``TAG``.
MESSAGE_TYPES: tuple[type[Message], ...] = (
    Done, ErrorReply, HelloReply, HelloRequest, StartReply, StartRequest, SignalRequest,
    TcpCheckReply, TcpCheckRequest, ExecReply, ExecRequest, ReleaseRequest, LinkRequest,
    PartitionRequest, HealRequest, StatsReply, StatsRequest, FreezeRequest, PrepareRequest,
    CensusReply, CensusRequest, OwnDirRequest, ShutdownReply, ShutdownRequest, KeepRequest,
    ExitedEvent, SupervisorDied,
)  # fmt: skip
_BY_TAG: dict[str, type[Message]] = {t.TAG: t for t in MESSAGE_TYPES}
#: Each message's field names, in order (``__slots__`` holds them too, but says less).
_FIELDS: dict[type[Any], tuple[str, ...]] = {
    t: tuple(f.name for f in fields(t))
    for t in (*MESSAGE_TYPES, CgroupLimits, NetWiring)
}


def _plan(d: dict[str, Any]) -> SandboxPlan:
    return SandboxPlan.from_dict(d)


def _ranges(v: list[list[int]]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in v]


#: The fields JSON does not give back as they were sent: field -> what makes them so again.
_DECODE: dict[type[Message], dict[str, Callable[[Any], Any]]] = {
    StartRequest: {"plan": _plan, "limits": lambda d: CgroupLimits(**d),
                   "net": lambda d: None if d is None else NetWiring(**d)},
    StartReply: {"ports": lambda d: {int(k): v for k, v in d.items()}},
    ExecRequest: {"plan": _plan},
    HelloReply: {"uid_map": _ranges, "gid_map": _ranges},
}  # fmt: skip


def _nested(obj: Any) -> Any:
    """json's ``default``: a nested value as a JSON object."""
    if isinstance(obj, SandboxPlan):
        return obj.to_dict()
    names = _FIELDS.get(type(obj))
    if names is None:
        raise TypeError(f"{type(obj).__name__} cannot be sent to the supervisor")
    return {name: getattr(obj, name) for name in names}


def encode(msg: Message, req_id: int | None = None) -> bytes:
    """``msg`` as one frame; ``req_id`` for a request and its reply (None for an event)."""
    obj: dict[str, Any] = {"t": msg.TAG}
    if req_id is not None:
        obj["id"] = req_id
    for name in _FIELDS[type(msg)]:
        obj[name] = getattr(msg, name)
    data = json.dumps(obj, separators=(",", ":"), default=_nested).encode()
    return _HEADER.pack(len(data)) + data


def decode(obj: dict[str, Any]) -> tuple[int | None, Message]:
    """A frame's JSON object as its request id (None for an event) and its message."""
    try:
        cls = _BY_TAG[obj.pop("t")]
    except KeyError:
        raise ProtocolError(f"not a message of the supervisor's protocol: {obj!r:.200}") from None
    req_id = obj.pop("id", None)
    for name, convert in _DECODE.get(cls, {}).items():
        obj[name] = convert(obj[name])
    try:
        return req_id, cls(**obj)
    except TypeError as e:
        raise ProtocolError(f"a {cls.__name__} with the wrong fields: {e}") from None


class FrameReader:
    """Incremental decoder: feed bytes, get whole messages (with their request ids)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int | None, Message]]:
        self._buf += data
        out: list[tuple[int | None, Message]] = []
        while len(self._buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ProtocolError(f"frame of {n} bytes is too large")
            if len(self._buf) < _HEADER.size + n:
                break
            out.append(decode(json.loads(self._buf[_HEADER.size : _HEADER.size + n])))
            del self._buf[: _HEADER.size + n]
        return out


def recv_messages(sock: socket.socket, reader: FrameReader) -> list[tuple[int | None, Message]] | None:
    """Read what is available (blocking for at least one byte); None at EOF."""
    data = sock.recv(1 << 16)
    if not data:
        return None
    return reader.feed(data)
