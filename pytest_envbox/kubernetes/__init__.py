"""Kubernetes manifests as envbox services: ``load_manifests([Path("deploy/app.yaml")])``.

Pure logic (no kernel, no engine): multi-document YAML read with PyYAML's safe loader (imported
only when a manifest is read), mapped to frozen data (:mod:`.model`) holding one envbox
:class:`~pytest_envbox.spec.Service` per container, with every mistake a
:class:`~pytest_envbox.kubernetes.model.KubeError` (a ``ConfigError``) naming the file, the
document (``Deployment/frontend``), the field path and what to do instead.

Kinds: Pod, Deployment, StatefulSet and Job (their pod templates) are workloads; Service,
ConfigMap and Secret are read; ``List`` (and ``*List``) objects are flattened; every other kind
(Namespace, Ingress, NetworkPolicy, ServiceAccount, RBAC, PVC, HPA, DaemonSet, CronJob, custom
resources...) is recorded in ``KubeProject.ignored`` as ``(file, "Kind/name", None)``.

Names. Pods are named as Kubernetes names a StatefulSet's: ``<workload>-<i>`` for i in
0..replicas-1, except that a Pod, Deployment or Job with one replica is just ``<workload>``. The
envbox service of a container is its pod's name when the pod has one (non-init) container, else
``<pod>-<container>``; init containers are always ``<pod>-<container>``. Each name must be a DNS
label (63 characters at most) and unique in the project. ``Container.service`` is named for the
first pod; ``Workload.service_name(pod, container)`` gives the others. A Service often shares its
name with a workload (``redis-master``): inside the environment the name is the Service's.

Mapping (container -> Service):

==========================  =================================================================
image, imagePullPolicy      image; pull (IfNotPresent: missing, Always: always, Never: never)
command, args               ``command`` non-empty: envbox ``command`` = command + args (the
                            image's Entrypoint and Cmd replaced, as Kubernetes does); ``args``
                            alone: envbox ``args`` (the Entrypoint kept). ``$(VAR)`` expands
                            from the container's env exactly as Kubernetes does (:mod:`.expand`)
env, envFrom, valueFrom     env: envFrom first (with ``prefix``), then env in order (its values
                            expanded against the variables before them); configMapKeyRef and
                            secretKeyRef (``optional: true`` skips a missing one); fieldRef
                            metadata.name -> :data:`~.model.POD_NAME`, status.podIP ->
                            :data:`~.model.POD_IP` (placeholders the engine replaces, per pod,
                            in env, command and args; ``Container.placeholders`` lists the
                            variables), metadata.namespace (``default`` unless the document
                            says), metadata.labels['k']
ports                       ports (containerPort; names kept in ``Container.port_names``)
resources                   limits.memory, limits.cpu; requests.memory/cpu only where no limit
                            is given (``Container.requests_as_limits`` says which)
readinessProbe              ready: httpGet (port number or name, path; HTTP only), tcpSocket,
                            exec. interval = min(periodSeconds, 1 s): a test gains from noticing
                            readiness early and polling costs nothing; timeout = initialDelay +
                            failureThreshold x (periodSeconds + timeoutSeconds) (defaults: 33 s).
                            The raw numbers are kept in ``Container.probe`` (the engine should
                            wait initialDelaySeconds before the first attempt)
securityContext             user: runAsUser[:runAsGroup], the container's over the pod's
workingDir                  cwd
volumeMounts                configMap/secret volumes (items, defaultMode, mode, subPath) ->
                            ``Container.files`` (content, path, mode: the engine writes and
                            mounts them read-only); emptyDir with medium Memory mounted by one
                            container -> Service.tmpfs (sizeLimit, else 512Mi); any other
                            emptyDir, a persistentVolumeClaim or a StatefulSet claim template ->
                            ``Container.dirs`` (one private directory per pod, shared by its
                            containers)
==========================  =================================================================

Ignored and recorded (file, document, key path): metadata.annotations and server-set metadata;
pod nodeSelector, affinity, tolerations, serviceAccountName, imagePullSecrets,
terminationGracePeriodSeconds, restartPolicy, dnsPolicy, priorityClassName, topologySpread...;
container livenessProbe, startupProbe, lifecycle, terminationMessage*, ports' hostPort;
probe httpHeaders and successThreshold; securityContext other than runAsUser/runAsGroup,
privileged and capabilities.add (runAsNonRoot, readOnlyRootFilesystem, fsGroup, seccomp...), and
runAsGroup without runAsUser; Deployment strategy, minReadySeconds...; StatefulSet
updateStrategy, podManagementPolicy, volumeClaimTemplates (private directories); Job
completions, activeDeadlineSeconds...; Service sessionAffinity, externalTrafficPolicy, nodePort, a fixed
clusterIP; resources' ephemeral-storage; ConfigMap/Secret ``immutable`` and ``type``. The full
tables are :mod:`.keys`.

Refused (KubeError with the fix): malformed YAML (line, column); unknown fields; hostNetwork,
hostPID, hostIPC; privileged: true; capabilities.add; hostPath volumes (and every volume source
but configMap, secret, emptyDir, persistentVolumeClaim); a grpc probe, an HTTPS probe, a probe
``host``; protocols other than TCP; a Service without a selector, selecting no pod, or with a
targetPort name no selected container declares; an ExternalName Service; a missing ConfigMap,
Secret or key that is not ``optional``; a duplicated container, port or object name; a name that
makes an invalid or duplicate envbox service name; extended resources (GPUs, huge pages);
hostAliases, ephemeralContainers, volumeDevices, subPathExpr, selector matchExpressions,
resourceFieldRef and other fieldPaths.

What the engine must add (this package only describes it): the containers of a pod share one
network namespace (localhost between them); init containers run to completion, in order, before
the pod's containers; ``replicas`` pods each get their own services and address; a Service's name
resolves to one address in the environment's hub and its ``port`` is DNAT'ed to each selected
pod's ``target_port`` (``KubeService.backends``; headless Services resolve to the pods); the
placeholders replaced; ``files`` written and ``dirs`` created and mounted.
"""

from __future__ import annotations

from pytest_envbox.kubernetes.load import load_manifests
from pytest_envbox.kubernetes.model import (
    POD_IP,
    POD_NAME,
    Backend,
    Container,
    DirMount,
    FileMount,
    Ignored,
    KubeError,
    KubeProject,
    KubeService,
    ProbeTiming,
    ProjectedFile,
    ServicePort,
    Workload,
)

__all__ = [
    "POD_IP",
    "POD_NAME",
    "Backend",
    "Container",
    "DirMount",
    "FileMount",
    "Ignored",
    "KubeError",
    "KubeProject",
    "KubeService",
    "ProbeTiming",
    "ProjectedFile",
    "ServicePort",
    "Workload",
    "load_manifests",
]
