"""Cgroups: one per service, with its limits, its usage figures, a freezer and a kill switch.

One narrow interface (:mod:`.base`), in the spirit of crun's per-version cgroup managers and
youki's ``CgroupManager``: a :class:`CgroupBackend` per run makes a :class:`ServiceCgroup` per
run of a service. :func:`open_backend` picks the backend by what the host has (:mod:`.host`);
:class:`CgroupTree` keeps the services' cgroups by slot. What each backend does:

operation     v2 (.v2)                  v1 (.v1)                     hybrid (.hybrid)       disabled
                                                                                            (.disabled)
------------  ------------------------  ---------------------------  ---------------------  ------------------
open_backend  envbox-<pid>-<start> in   the same in each v1          v1's, and one in the   what is left when
(the run)     our own cgroup, memory    hierarchy (memory, cpu,      cgroup2 mount (else    that fails:
              cpu pids enabled (our     cpuacct, pids; freezer if    the v1 backend)        problem says why
              processes moved to a      mounted)                                            and how to fix
              leaf if delegated:
              .delegation)
new(name)     <run>/<name>              in each hierarchy            in each, and in        CgroupsUnavailable
                                                                     cgroup2
require()     nothing                   nothing                      nothing                CgroupsUnavailable
set_limits    memory.max,               memory.limit_in_bytes,       as v1                  (refused before:
              memory.swap.max 0,        memory.memsw.limit_in_bytes                         check_limits)
              cpu.max, pids.max         (else swappiness 0),
                                        cpu.cfs_period_us,
                                        cpu.cfs_quota_us, pids.max
placement()   the directory's fd, to    cgroup.procs of each         v1's and cgroup2's     (NOWHERE)
              clone into; cgroup.procs  hierarchy: the process       cgroup.procs
              for a plain fork          writes itself in
add(pid)      cgroup.procs              each cgroup.procs            each cgroup.procs
stats()       memory.current,           memory.usage_in_bytes,       as v1
              memory.peak, cpu.stat,    memory.max_usage_in_bytes,
              pids.current,             cpuacct.usage,
              memory.events             pids.current,
                                        memory.oom_control
freeze()      cgroup.freeze, until      freezer.state, until it      cgroup2's
              cgroup.events says        reads FROZEN (THAWED)        cgroup.freeze (v1's
              frozen                                                 before Linux 5.2)
kill()        cgroup.kill (Linux        freeze, SIGKILL each, thaw   cgroup2's
              5.14), else freeze,       (the freezer tree below      cgroup.kill, else as
              SIGKILL each, thaw        too)                         v1
is_empty()    cgroup.events populated   no pid in cgroup.procs (or   cgroup2's
                                        below)                       cgroup.events
remove()      kill, wait until empty,   the same in each hierarchy   the same in each, and  nothing to remove
              rmdir deepest first                                    in cgroup2

The disabled backend never makes a service's cgroup, so the operations below ``new`` never reach
it: callers catch :class:`CgroupsUnavailable` (from ``new``, ``require``, ``CgroupTree.check_limits``
and ``CgroupTree.service``) where a missing cgroup matters, and go on without one elsewhere.

Everything is nested under the cgroup the test process is already in, never at a hierarchy root
it does not own and never next to it: ``<own cgroup>/envbox-<pid>-<start time>/<n>``. The run
directory names its supervisor (:mod:`.runs`), so a later run (or ``envbox clean``) can tell a
stale one (its supervisor is gone: SIGKILLed) from a live one and remove it.

Hand-written on purpose: no maintained Python library covers v1, v2 and hybrid hosts (the few
that exist are v1-only or wrap systemd over D-Bus), and this package is imported by the lean
supervisor, where a dependency would also cost start-up time.
"""

from __future__ import annotations

from pytest_envbox.kernel.cgroups.base import (
                                               NOWHERE,
                                               CgroupBackend,
                                               CgroupError,
                                               CgroupsUnavailable,
                                               Placement,
                                               ServiceCgroup,
                                               Usage,
)
from pytest_envbox.kernel.cgroups.delegation import LEAF, delegated, enable_controllers, v2_base
from pytest_envbox.kernel.cgroups.disabled import DisabledBackend, explain
from pytest_envbox.kernel.cgroups.host import V1_CONTROLLERS, V2_CONTROLLERS, CgroupHost, detect, parse_host
from pytest_envbox.kernel.cgroups.hybrid import HybridBackend, HybridCgroup
from pytest_envbox.kernel.cgroups.quantities import CPU_PERIOD_US, cpu_quota, format_memory
from pytest_envbox.kernel.cgroups.runs import RUN_PREFIX, clean_stale, is_stale, run_name
from pytest_envbox.kernel.cgroups.tree import CgroupTree, open_backend
from pytest_envbox.kernel.cgroups.v1 import V1Backend, V1Cgroup
from pytest_envbox.kernel.cgroups.v2 import V2Backend, V2Cgroup

__all__ = [
    "CPU_PERIOD_US", "LEAF", "NOWHERE", "RUN_PREFIX", "V1_CONTROLLERS", "V2_CONTROLLERS",
    "CgroupBackend", "CgroupError", "CgroupHost", "CgroupTree", "CgroupsUnavailable",
    "DisabledBackend", "HybridBackend", "HybridCgroup", "Placement", "ServiceCgroup", "Usage",
    "V1Backend", "V1Cgroup", "V2Backend", "V2Cgroup", "clean_stale", "cpu_quota", "delegated",
    "detect", "enable_controllers", "explain", "format_memory", "is_stale", "open_backend",
    "parse_host", "run_name", "v2_base",
]  # fmt: skip
