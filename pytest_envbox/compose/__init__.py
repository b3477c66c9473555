"""Compose files as envbox services: ``load_compose(["compose.yaml"], environ=os.environ)``.

Pure logic (no kernel, no engine): the files are read, interpolated, merged and mapped to
:class:`~pytest_envbox.spec.Service` specs, with every mistake a
:class:`~pytest_envbox.errors.ConfigError` naming the file, the service and the key. PyYAML is
imported only when a compose file is read.

What each service key becomes (the tables are :mod:`pytest_envbox.compose.keys`):

========================  ====================================================================
mapped                    image, command (-> args), entrypoint (-> command: entrypoint +
                          command), environment, env_file, ports and expose (container ports;
                          host ports are not bound), depends_on (service_started,
                          service_healthy), healthcheck (-> an exec probe), deploy.resources
                          .limits, mem_limit, cpus, pids_limit, ulimits.nofile, shm_size, user,
                          working_dir (-> cwd), volumes (bind -> mounts, tmpfs -> tmpfs), tmpfs,
                          network_mode: service:NAME (-> network_of), depends_on condition
                          service_completed_successfully (-> the dependency is oneshot),
                          networks.*.aliases, stop_grace_period (-> stop_timeout), profiles,
                          pull_policy, extends (a service of the same file), secrets and configs
                          backed by a file (-> read-only mounts)
kept beside the Service   named and anonymous volumes, stop_signal, a disabled health check
                          (``ComposeProject.volumes``, ``.stop_signals``,
                          ``.healthcheck_disabled``): :mod:`pytest_envbox.sources` makes them
                          the Service's ``volumes``, ``stop_signal`` and ``healthcheck``
ignored, and listed       annotations, attach, blkio_config, cgroup, cgroup_parent,
                          container_name, cpu_count, cpu_percent, cpu_period, cpu_quota,
                          cpu_rt_period, cpu_rt_runtime, cpu_shares, cpuset, cap_drop,
                          credential_spec, develop, dns, dns_opt, dns_search, domainname,
                          group_add, hostname, init, isolation, labels, label_file, links,
                          logging, mac_address, mem_reservation, mem_swappiness, memswap_limit,
                          oom_kill_disable, oom_score_adj, platform, read_only, restart,
                          security_opt, stdin_open, storage_opt, tty; deploy's mode, labels,
                          placement, restart_policy, update_config, rollback_config,
                          endpoint_mode, resources.reservations; ulimits other than nofile;
                          networks.* other than aliases; healthcheck timings without a test;
                          privileged: false; network_mode: bridge; pid/ipc/uts/userns_mode
                          private values; uid, gid, mode of secrets and configs; top-level
                          version, name, networks, volumes, models (definitions); x- fields
                          (silently)
refused (ConfigError)     build, cap_add, devices, device_cgroup_rules, gpus,
                          extends.file, external_links, extra_hosts, models, post_start, pre_start,
                          pre_stop, provider, runtime, sysctls, use_api_socket, volumes_from,
                          privileged: true, network_mode other than bridge and service:NAME,
                          pid/ipc/uts/userns_mode: host (or another service's), scale or
                          deploy.replicas above 1, ports/expose other than TCP, volumes of type
                          image/npipe/cluster, pull_policy: build, secrets/configs not backed
                          by a file (environment, content, external), top-level include,
                          unknown keys
========================  ====================================================================
"""

from __future__ import annotations

from pytest_envbox.compose.convert import DEFAULT_TMPFS, VolumeMount
from pytest_envbox.compose.interpolate import ComposeError
from pytest_envbox.compose.load import ComposeProject, Ignored, load_compose

__all__ = ["DEFAULT_TMPFS", "ComposeError", "ComposeProject", "Ignored", "VolumeMount", "load_compose"]
