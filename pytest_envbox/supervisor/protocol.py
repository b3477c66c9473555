"""The supervisor's protocol: every message a frozen dataclass.

A request names its reply's type (``Request[ReplyT]``), so that the client's
``call(StartRequest(...))`` is a ``StartReply`` to the type checker
(:meth:`~pytest_envbox.engine.client.SupervisorClient.call`). How a message crosses the socket
(one frame each, and their one codec) is :mod:`.wire`'s.

Most messages are a request, its reply, or an event. ``exec`` also streams: a command's output
comes back as :class:`ExecOutput` parts under the request's id before its :class:`ExecReply`,
and a large ``input=`` goes out as :class:`ExecInput` parts after the :class:`ExecRequest`, so
that no frame grows with a command's output (a 12 MB ``pg_dump`` to stdout is a fair use).

Imported by the supervisor's lean interpreter (``python -S``): the standard library only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pytest_envbox.sandbox.plan import SandboxPlan
from pytest_envbox.supervisor.unsupported import Unsupported  # what a handler raises

__all__ = [
    "EXEC_CHUNK", "EXEC_STREAM_CAP", "MESSAGE_TYPES", "CensusReply", "CensusRequest", "CgroupLimits",
    "Done", "ErrorReply", "Event", "ExecInput", "ExecOutput", "ExecReply", "ExecRequest", "ExitedEvent",
    "FreezeRequest", "Handlers", "HealRequest", "HelloReply", "HelloRequest", "KeepRequest",
    "LendRequest", "LinkRequest", "Message", "NetWiring", "NetworkReply", "NetworkRequest",
    "OwnDirRequest", "PartitionRequest", "PrepareRequest", "ReleaseRequest", "Reply", "ReplyT",
    "Request", "ReserveReply", "ReserveRequest", "ShutdownReply", "ShutdownRequest",
    "SignalRequest", "StartReply", "StartRequest", "StatsReply", "StatsRequest", "SupervisorDied",
    "TcpCheckReply", "TcpCheckRequest", "Unsupported", "VirtualAddressRequest",
]  # fmt: skip

#: The most bytes of a command's input or output that one exec part (or its reply) carries.
EXEC_CHUNK = 1 << 20
#: The most bytes ``exec`` takes as input, or collects from each of stdout and stderr: past it,
#: the command is killed and the call fails (its whole output is held in the test process's
#: memory, as ``subprocess.run`` holds it).
EXEC_STREAM_CAP = 256 << 20


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
    is None for a service without a network; ``join`` names the slot whose network namespace a
    new slot shares (a pod's containers), instead of being wired itself."""

    TAG: ClassVar[str] = "start"
    slot: str
    plan: SandboxPlan
    log_path: str
    ports: list[int]
    generation: int
    limits: CgroupLimits
    net: NetWiring | None
    join: str | None = None


@dataclass(frozen=True, slots=True)
class ReserveReply(Reply):
    """Every host port asked for is held (``refused`` None); or none of them is, and ``refused``
    is the first that could not be bound, as ``(slot, port, low, high, errno)``."""

    TAG: ClassVar[str] = "reserve_reply"
    refused: tuple[str, int, int, int, int] | None


@dataclass(frozen=True, slots=True)
class ReserveRequest(Request[ReserveReply]):
    """Bind, and hold until the slot publishes them, the host ports that an environment's
    services fix: ``(slot, port, low, high)`` each, the first free port of ``low..high`` on
    127.0.0.1. All or nothing, before any of them starts: a taken port then fails the
    environment with nothing to undo."""

    TAG: ClassVar[str] = "reserve"
    ports: list[tuple[str, int, int, int]]


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
    """The command has ended: its exit code and the last of its output (the rest came before,
    as :class:`ExecOutput`); ``exec_error`` says why it could not be run; ``overflow`` names the
    stream that passed :data:`EXEC_STREAM_CAP`, for which the command was killed."""

    TAG: ClassVar[str] = "exec_reply"
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    exec_error: str | None
    overflow: Literal["stdout", "stderr"] | None = None


@dataclass(frozen=True, slots=True)
class ExecRequest(Request[ExecReply]):
    """Run ``argv`` inside the running service of ``slot``, as ``plan`` says (its user, env...).

    ``input``: the first :data:`EXEC_CHUNK` bytes of its stdin; with ``more_input``, the rest
    follows as :class:`ExecInput` parts (the last with ``end``); without, stdin ends there.
    """

    TAG: ClassVar[str] = "exec"
    slot: str
    plan: SandboxPlan
    argv: list[str]
    input: bytes
    more_input: bool
    timeout: float | None


@dataclass(frozen=True, slots=True)
class ExecInput(Message):
    """More of an exec's stdin (at most :data:`EXEC_CHUNK` bytes), under its request's id;
    ``end``: the last part. Unanswered: a part for an exec that is over is dropped."""

    TAG: ClassVar[str] = "exec_input"
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class ExecOutput(Message):
    """Output of a running exec (at most :data:`EXEC_CHUNK` bytes of one stream), under its
    request's id; the client joins the parts to the reply's own."""

    TAG: ClassVar[str] = "exec_output"
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True, slots=True)
class ReleaseRequest(Request[Done]):
    """Free the slots (killing what still runs there); forget ``disown``, a directory the
    supervisor was to delete if the test process died; delete ``remove``, another, now."""

    TAG: ClassVar[str] = "release"
    slots: list[str]
    disown: str | None = None
    remove: str | None = None


@dataclass(frozen=True, slots=True)
class NetworkReply(Reply):
    """An environment's network: its ``subnet``, whether the host routes it to the environment
    (``routed``), and if not, why (``why``)."""

    TAG: ClassVar[str] = "network_reply"
    subnet: str
    routed: bool
    why: str | None


@dataclass(frozen=True, slots=True)
class NetworkRequest(Request[NetworkReply]):
    """Give environment ``env`` its network now (again: the same one): ``subnet`` as
    configured, or None for one of the host's free ones. Its services' addresses follow from it.
    ``drop``: the environment is closing without a service on it: free its network."""

    TAG: ClassVar[str] = "network"
    env: str
    subnet: str | None
    drop: bool = False


@dataclass(frozen=True, slots=True)
class LendRequest(Request[Done]):
    """Make ``count`` TCP sockets in environment ``env``'s network and send them over the
    supervisor's descriptor socket (``SCM_RIGHTS``), before the reply: each then connects to a
    service's address from the test process (rootless mode's way in)."""

    TAG: ClassVar[str] = "lend"
    env: str
    count: int


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
class VirtualAddressRequest(Request[Done]):
    """Virtual ``address`` of ``env``'s subnet: TCP/UDP to each ``(port, backends)`` goes to one
    of its backends ``(address, port)`` per connection; replaces, or none: removes (vips.py)."""

    TAG: ClassVar[str] = "virtual_address"
    env: str
    address: str
    ports: list[tuple[int, list[tuple[str, int]]]]


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
    host_links: list[str] = field(default_factory=list)  # its hubs' links on the host, by name


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


#: A concern's handlers: each takes a request's id and the request (or a part of one, an
#: :class:`ExecInput`), and returns the reply, or None when the reply comes later (a start, an
#: exec) or there is none (a part).
Handlers = dict[type[Message], Callable[[int, Any], Reply | None]]

#: Every message type, each with its own ``TAG``.
MESSAGE_TYPES: tuple[type[Message], ...] = (
    Done, ErrorReply, HelloReply, HelloRequest, StartReply, StartRequest, ReserveReply, ReserveRequest,
    SignalRequest, TcpCheckReply, TcpCheckRequest, ExecReply, ExecRequest, ExecInput, ExecOutput,
    ReleaseRequest, LinkRequest, PartitionRequest, HealRequest, StatsReply, StatsRequest, FreezeRequest,
    PrepareRequest, CensusReply, CensusRequest, OwnDirRequest, ShutdownReply, ShutdownRequest, KeepRequest,
    ExitedEvent, SupervisorDied, NetworkReply, NetworkRequest, LendRequest, VirtualAddressRequest,
)  # fmt: skip
