"""Cgroups: one per service, with its limits, its usage figures, a freezer and a kill switch.

- **cgroup v2** (unified): ``memory.max`` + ``memory.swap.max = 0``, ``cpu.max``, ``pids.max``;
  ``memory.events`` (``oom_kill``), ``memory.peak``, ``cpu.stat``; ``cgroup.freeze``, ``cgroup.kill``.
- **cgroup v1** (legacy): ``memory.limit_in_bytes`` (+ ``memory.memsw.limit_in_bytes``),
  ``memory.max_usage_in_bytes``, ``memory.oom_control`` (``oom_kill``), ``cpu.cfs_quota_us``,
  ``cpuacct.usage``, ``pids.max``, the ``freezer`` controller.
- **hybrid** (v1 controllers plus a controller-less cgroup2 mount, as on this project's own CI):
  limits and figures in v1; freezing, killing and "is it empty" in a child of the cgroup2 mount,
  which offers ``cgroup.freeze``, ``cgroup.kill`` and ``cgroup.events`` even without controllers
  (runc and crun do the same).

Everything is nested under the cgroup the test process is already in, never at a hierarchy root
it does not own and never next to it: ``<own cgroup>/envbox-<pid>-<start time>/<n>`` (see
:mod:`.runs`).

Hand-written on purpose: no maintained Python library covers v1, v2 and hybrid hosts (the few
that exist are v1-only or wrap systemd over D-Bus), and this package is imported by the lean
supervisor, where a dependency would also cost start-up time.
"""

from __future__ import annotations

from pytest_envbox.kernel.cgroups.cgroupfs import write
from pytest_envbox.kernel.cgroups.delegation import LEAF, delegated, enable_controllers, v2_base
from pytest_envbox.kernel.cgroups.host import V1_CONTROLLERS, V2_CONTROLLERS, CgroupHost, detect, parse_host
from pytest_envbox.kernel.cgroups.quantities import CPU_PERIOD_US, cpu_quota, format_memory
from pytest_envbox.kernel.cgroups.runs import RUN_PREFIX, clean_stale, is_stale, run_name
from pytest_envbox.kernel.cgroups.tree import CgroupError, CgroupTree, ServiceCgroup

__all__ = [
    "CPU_PERIOD_US", "LEAF", "RUN_PREFIX", "V1_CONTROLLERS", "V2_CONTROLLERS", "CgroupError",
    "CgroupHost", "CgroupTree", "ServiceCgroup", "clean_stale", "cpu_quota", "delegated", "detect",
    "enable_controllers", "format_memory", "is_stale", "parse_host", "run_name", "v2_base", "write",
]  # fmt: skip
