"""Every key envbox reads in a manifest, and what it does with it.

Per object (pod spec, container, workload spec...): ``MAPPED`` keys become the envbox services
and Services; ``IGNORED`` keys do not matter to a test run and are recorded in
``KubeProject.ignored`` (file, document, key path); ``REFUSED`` keys cannot be honoured and are a
:class:`~pytest_envbox.kubernetes.model.KubeError` saying what to do instead. Any other key is a
typo (as ``kubectl apply --validate=strict`` says), refused with the closest known key.
docs/kubernetes.md's table "Every field" copies these (tests/unit/test_import_docs.py compares).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "CONTAINER",
    "METADATA",
    "POD",
    "POD_SECURITY",
    "PROBE",
    "SECURITY",
    "SERVICE",
    "VOLUME_MOUNT",
    "WORKLOAD",
    "Keys",
]


class Keys(NamedTuple):
    """The keys of one kind of object: read, ignored (harmless), refused (with what to do)."""

    mapped: tuple[str, ...]
    ignored: tuple[str, ...]
    refused: dict[str, str]


METADATA = Keys(
    mapped=("name", "namespace", "labels"),
    ignored=("annotations", "generateName", "finalizers", "ownerReferences", "uid",
             "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
             "deletionGracePeriodSeconds", "managedFields", "selfLink"),
    refused={},
)  # fmt: skip

POD = Keys(
    mapped=("containers", "initContainers", "volumes", "securityContext", "hostNetwork",
            "hostPID", "hostIPC"),
    ignored=("nodeSelector", "affinity", "tolerations", "serviceAccountName", "serviceAccount",
             "automountServiceAccountToken", "imagePullSecrets", "terminationGracePeriodSeconds",
             "restartPolicy", "dnsPolicy", "dnsConfig", "priorityClassName", "priority",
             "schedulerName", "topologySpreadConstraints", "enableServiceLinks",
             "preemptionPolicy", "hostname", "subdomain", "setHostnameAsFQDN", "nodeName",
             "overhead", "readinessGates", "shareProcessNamespace", "activeDeadlineSeconds", "os",
             "runtimeClassName", "schedulingGates", "hostUsers", "resourceClaims", "resources"),
    refused={"hostAliases": "names resolve to the environment's services only; declare a Service "
                            "for the host name instead",
             "ephemeralContainers": "debug containers are not run; remove them"},
)  # fmt: skip

CONTAINER = Keys(
    mapped=("name", "image", "command", "args", "workingDir", "env", "envFrom", "ports",
            "resources", "readinessProbe", "securityContext", "volumeMounts", "imagePullPolicy"),
    ignored=("livenessProbe", "startupProbe", "lifecycle", "terminationMessagePath",
             "terminationMessagePolicy", "stdin", "stdinOnce", "tty", "resizePolicy",
             "restartPolicy"),
    refused={"volumeDevices": "services get no host devices; remove it"},
)  # fmt: skip

SECURITY = Keys(
    mapped=("runAsUser", "runAsGroup", "privileged", "capabilities"),
    ignored=("allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot",
             "seccompProfile", "seLinuxOptions", "appArmorProfile", "fsGroup",
             "fsGroupChangePolicy", "supplementalGroups", "supplementalGroupsPolicy", "sysctls",
             "windowsOptions", "procMount", "seLinuxChangePolicy"),
    refused={},
)  # fmt: skip

#: A pod's securityContext: runAsUser and runAsGroup are every container's defaults.
POD_SECURITY = Keys(("runAsUser", "runAsGroup"), tuple(k for k in SECURITY.ignored if k != "procMount"), {})

#: ``grpc`` is checked as ``tcpSocket`` on its port (envbox has no gRPC health client), and that
#: substitution is listed with the ignored keys.
PROBE = Keys(
    mapped=("httpGet", "tcpSocket", "exec", "grpc", "initialDelaySeconds", "periodSeconds",
            "timeoutSeconds", "failureThreshold"),
    ignored=("successThreshold", "terminationGracePeriodSeconds"),
    refused={},
)  # fmt: skip

VOLUME_MOUNT = Keys(
    mapped=("name", "mountPath", "readOnly", "subPath"),
    ignored=("mountPropagation", "recursiveReadOnly"),
    refused={"subPathExpr": "expand the path yourself and use subPath"},
)  # fmt: skip

#: spec keys of each workload kind besides ``template`` (Pod: the pod spec itself).
WORKLOAD: dict[str, Keys] = {
    "Deployment": Keys(("replicas", "selector", "template"),
                       ("strategy", "minReadySeconds", "revisionHistoryLimit",
                        "progressDeadlineSeconds", "paused"), {}),
    "StatefulSet": Keys(("replicas", "selector", "template", "serviceName", "volumeClaimTemplates"),
                        ("podManagementPolicy", "updateStrategy", "revisionHistoryLimit",
                         "minReadySeconds", "persistentVolumeClaimRetentionPolicy", "ordinals"),
                        {}),
    "Job": Keys(("parallelism", "selector", "template", "backoffLimit"),
                ("completions", "activeDeadlineSeconds", "ttlSecondsAfterFinished",
                 "completionMode", "suspend", "podFailurePolicy", "manualSelector",
                 "backoffLimitPerIndex", "maxFailedIndexes", "podReplacementPolicy",
                 "successPolicy", "managedBy"), {}),
}  # fmt: skip

SERVICE = Keys(
    mapped=("selector", "ports", "type", "clusterIP"),
    ignored=("clusterIPs", "sessionAffinity", "sessionAffinityConfig", "externalTrafficPolicy",
             "internalTrafficPolicy", "loadBalancerIP", "loadBalancerSourceRanges",
             "loadBalancerClass", "allocateLoadBalancerNodePorts", "healthCheckNodePort",
             "ipFamilies", "ipFamilyPolicy", "publishNotReadyAddresses", "trafficDistribution",
             "externalIPs"),
    refused={"externalName": "an ExternalName Service points outside the environment, which is "
                             "unreachable; declare a workload that serves the name instead"},
)  # fmt: skip
