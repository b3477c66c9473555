"""Every service key of the Compose Specification, and what envbox does with it.

Three tables, which ``docs/compose.md`` copies (tests/unit/test_import_docs.py compares the two
both ways): :data:`MAPPED` keys become the envbox service (API.md 7); :data:`IGNORED` keys do not
matter to a test run and are listed by ``envbox doctor --config`` (``ComposeProject.ignored``);
:data:`REFUSED` keys cannot be honoured and are a :class:`~pytest_envbox.errors.ConfigError`
naming the file, the service and the key, with what to do instead. A few keys are refused for
some values only (:data:`BY_VALUE`, :func:`refused_value`): ``network_mode: host`` is refused,
``network_mode: bridge`` ignored. Any other key is a typo, refused with the closest known key.
``x-`` keys are extension fields and skipped silently.
"""

from __future__ import annotations

__all__ = ["BY_VALUE", "DEPLOY_IGNORED", "HEALTHCHECK_KEYS", "IGNORED", "MAPPED", "REFUSED", "refused_value"]

MAPPED: dict[str, str] = {
    "image": "image",
    "command": "args (the image's Cmd; a string is split with shlex)",
    "entrypoint": "command = entrypoint + command (the image's Entrypoint and Cmd replaced)",
    "environment": "env (a name without a value takes it from the environment, or is left out)",
    "env_file": "env, under environment (paths relative to the project directory)",
    "ports": "ports: the container ports, each published on a free 127.0.0.1 port (host ports "
             "written in the file are not bound)",
    "expose": "ports",
    "depends_on": "depends_on (service_started and service_healthy: started and ready first)",
    "healthcheck": "ready: an exec probe (CMD, CMD-SHELL via /bin/sh -c; NONE or disable: none)",
    "deploy": "resources.limits -> limits (memory, cpus, pids); replicas 1",
    "mem_limit": "limits.memory",
    "cpus": "limits.cpu",
    "pids_limit": "limits.pids (-1 or 0: unlimited)",
    "ulimits": "nofile -> limits.nofile (its soft limit); the others ignored",
    "shm_size": "tmpfs /dev/shm",
    "user": "user",
    "working_dir": "cwd",
    "volumes": "bind mounts -> mounts (rw unless :ro); tmpfs -> tmpfs; named and anonymous "
               "volumes -> ComposeProject.volumes",
    "tmpfs": "tmpfs (512Mi each unless size= says otherwise)",
    "networks": "aliases (of every network: an environment is one network)",
    "stop_grace_period": "stop_timeout",
    "stop_signal": "ComposeProject.stop_signals",
    "profiles": "the service exists only when one of its profiles is active",
    "pull_policy": "pull (always, never, missing/if_not_present; daily/weekly: missing)",
    "scale": "1 (one copy)",
    "extends": "a service of the same file, merged in first (a base in another file: refused)",
    "secrets": "mounts: a top-level secret's `file`, read-only at /run/secrets/NAME (or its target)",
    "configs": "mounts: a top-level config's `file`, read-only at /NAME (or its target)",
}  # fmt: skip

IGNORED: dict[str, str] = {
    "annotations": "container metadata",
    "attach": "log attachment of `docker compose up`; envbox keeps every service's log",
    "blkio_config": "block I/O weights",
    "cgroup": "cgroup namespace mode; each service has its own cgroup",
    "cgroup_parent": "the parent cgroup; envbox places services in its own",
    "container_name": "envbox names services by their key",
    "cpu_count": "Windows only",
    "cpu_percent": "Windows only",
    "cpu_period": "CFS tuning; use cpus",
    "cpu_quota": "CFS tuning; use cpus",
    "cpu_rt_period": "real-time scheduling",
    "cpu_rt_runtime": "real-time scheduling",
    "cpu_shares": "relative weight, not a limit",
    "cpuset": "CPU pinning",
    "cap_drop": "envbox services run without host capabilities already",
    "credential_spec": "Windows only",
    "develop": "`docker compose watch`",
    "dns": "names resolve through the environment's /etc/hosts",
    "dns_opt": "names resolve through the environment's /etc/hosts",
    "dns_search": "names resolve through the environment's /etc/hosts",
    "domainname": "container domain name",
    "group_add": "supplementary groups",
    "hostname": "HOSTNAME is the service name",
    "init": "envbox reaps every service's processes itself",
    "isolation": "Windows only",
    "labels": "container metadata",
    "label_file": "container metadata",
    "links": "every service reaches every other by name already",
    "logging": "envbox keeps every service's log",
    "mac_address": "addresses are the environment's",
    "mem_reservation": "a reservation, not a limit",
    "mem_swappiness": "swap tuning",
    "memswap_limit": "swap tuning",
    "oom_kill_disable": "OOM tuning",
    "oom_score_adj": "OOM tuning",
    "platform": "the store pulls the host's platform",
    "read_only": "the service's writable layer is private and gone at teardown",
    "restart": "a service that exits fails the test that uses it",
    "security_opt": "envbox applies its own seccomp filter and no-new-privileges",
    "stdin_open": "no terminal",
    "storage_opt": "storage driver options",
    "tty": "no terminal",
}  # fmt: skip

REFUSED: dict[str, str] = {
    "build": "build the image first (docker build, buildah, kaniko...) and reference it by `image:`, "
             "or save it and use `image: oci-archive:FILE`; or run the service from your checkout "
             "with a [tool.envbox.services.NAME] table giving `image = false` and its `command` "
             "(or an `image`): the build is then ignored",
    "cap_add": "envbox gives services no capabilities on the host; run the program without them",
    "device_cgroup_rules": "services get no host devices",
    "devices": "services get no host devices",
    "external_links": "containers outside the environment are not reachable; declare the service "
                      "in the compose file",
    "extra_hosts": "names resolve to the environment's services only; declare the service, or an "
                   "alias for it with networks.*.aliases",
    "gpus": "services get no host devices",
    "models": "AI models are not provided",
    "post_start": "lifecycle hooks are not run; put the step in the command or entrypoint",
    "pre_start": "lifecycle hooks are not run; put the step in the command or entrypoint",
    "pre_stop": "lifecycle hooks are not run",
    "provider": "services run by a provider plugin are not run",
    "runtime": "envbox is the runtime",
    "sysctls": "kernel parameters of a service's namespaces are not set",
    "use_api_socket": "no container engine socket exists",
    "volumes_from": "mount the same host paths in both services",
}  # fmt: skip

#: Keys refused for some of their values (:func:`refused_value`) and, for the others, ignored
#: (the default already: ``privileged: false``, ``pid: private``) or mapped (``network_mode:
#: service:NAME``, ``scale: 1``); ``scale`` is in :data:`MAPPED` as well.
BY_VALUE = ("privileged", "network_mode", "pid", "ipc", "uts", "userns_mode", "scale")

#: healthcheck keys; ``start_interval`` becomes the probe's interval.
HEALTHCHECK_KEYS = ("test", "interval", "timeout", "retries", "start_period", "start_interval", "disable")
#: deploy keys that do not matter to a test run (``resources.limits`` and ``replicas`` are read).
DEPLOY_IGNORED = ("mode", "labels", "placement", "restart_policy", "update_config", "rollback_config",
                  "endpoint_mode")  # fmt: skip


def refused_value(key: str, value: object) -> str | None:
    """What to do instead, when ``key: value`` cannot be honoured; None when it is harmless."""
    text = str(value).strip() if value is not None else ""
    if key == "privileged":
        return "services never get the host's privileges; remove it" if value is True else None
    if key == "network_mode":
        if text in ("", "bridge", "default") or text.startswith("service:"):
            return None  # service:NAME: network_of (convert.py)
        if text == "none":
            return ("every service is on its environment's private network; remove network_mode "
                    "(the environment has no route outside anyway)")  # fmt: skip
        return ("every service is on its environment's private network (no host network, no "
                "shared namespaces); remove network_mode and reach other services by name")  # fmt: skip
    if key in ("pid", "ipc", "uts", "userns_mode"):
        if text in ("", "private", "shareable", "none"):
            return None
        return f"each service has its own namespaces; remove {key}: {text}"
    if key == "scale":
        return None if value in (0, 1) else "envbox runs one copy of a service; use scale: 1"
    return None
