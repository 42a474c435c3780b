"""Pure: one planned Stage -> one batch/v1 Job manifest (a dict ready for the API).

Every decision a cluster admin would review lives here: the deterministic Job name (a handler that runs
twice can only ever hit 409, never create a second Job), GPU limits, volume mounts and the nnUNet_* env,
/dev/shm sized from the spec, a podFailurePolicy under which evictions and preemptions do not use up
retries, a non-root pod without privilege escalation, Kueue admission, credentials only via secretKeyRef.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nnunet_distill.contract import (  # shared with the trainer: one definition, in the contract
    DEFAULT_TERMINATION_PATH,
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_JOB_STAGE,
    ENV_JOB_UID,
    KUEUE_QUEUE_LABEL,
)

from nnunet_distill_operator import api
from nnunet_distill_operator.distributed import with_rendezvous
from nnunet_distill_operator.plan import DataPaths, Stage
from nnunet_distill_operator.trees import copy_tree

LABEL_PREFIX = "distillation.nnunet.io"
LABEL_JOB = f"{LABEL_PREFIX}/job"  # the DistillationJob's name (hashed when longer than a label value)
LABEL_STAGE = f"{LABEL_PREFIX}/stage"
LABEL_JOB_UID = f"{LABEL_PREFIX}/job-uid"  # the DistillationJob's uid: a selector for any name length
ANNOTATION_JOB_NAME = f"{LABEL_PREFIX}/job-name"  # full DistillationJob name, read by the downward API
ANNOTATION_JOB_UID = f"{LABEL_PREFIX}/job-uid"
MANAGED_BY = "nnunet-distill-operator"

MAX_JOB_NAME = 52  # leaves room for "-<index>" in indexed pods' hostnames (63) and pod-name suffixes
EXIT_CODE_USAGE = 2  # argparse / configuration errors: retrying cannot help
CONTAINER_MAIN = "main"
TERMINATION_MESSAGE_PATH = DEFAULT_TERMINATION_PATH

# Credentials the publish pod gets from spec.output.secretRef: (env var, required?) per URI scheme. Required
# keys make a missing Secret or key stop the pod before it starts (CreateContainerConfigError), which the
# operator reports as SecretMissing / SecretKeyMissing naming spec.output.secretRef. Each scheme has one
# endpoint key for self-hosted or emulated stores (AWS_ENDPOINT_URL, GOOGLE_BASE_URL, AZURE_STORAGE_ENDPOINT);
# STORAGE_ALLOW_HTTP=true is the explicit opt-in to a plain-http endpoint.
ALLOW_HTTP_ENV = ("STORAGE_ALLOW_HTTP", False)
CREDENTIAL_ENV: dict[str, tuple[tuple[str, bool], ...]] = {
    "s3": (
        ("AWS_ACCESS_KEY_ID", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("AWS_REGION", False),
        ("AWS_ENDPOINT_URL", False),
        ("AWS_SESSION_TOKEN", False),
        ALLOW_HTTP_ENV,
    ),
    "gs": (
        ("GOOGLE_SERVICE_ACCOUNT_KEY", True),
        ("GOOGLE_SERVICE_ACCOUNT", False),
        ("GOOGLE_BASE_URL", False),
        ALLOW_HTTP_ENV,
    ),
    "az": (
        ("AZURE_STORAGE_ACCOUNT_NAME", True),
        ("AZURE_STORAGE_ACCOUNT_KEY", False),
        ("AZURE_STORAGE_SAS_TOKEN", False),
        ("AZURE_STORAGE_ENDPOINT", False),
        ALLOW_HTTP_ENV,
    ),
    "file": (),
}


@dataclass(frozen=True)
class Owner:
    """The DistillationJob that owns the Jobs (garbage collection through ownerReferences)."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class Defaults:
    """Operator-level defaults (flags / env of nnunet-distill-operator) for fields the spec may omit."""

    image: str = "ghcr.io/nnunet-distill/nnunet-distill-trainer:0.1.0"
    image_pull_policy: str | None = None
    service_account: str | None = None


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def job_name(cr_name: str, stage: str) -> str:
    """`<cr>-<stage>`, deterministic; shortened with a hash of the full name when too long."""
    name = f"{cr_name}-{stage}"
    if len(name) <= MAX_JOB_NAME:
        return name
    keep = MAX_JOB_NAME - len(stage) - 10
    return f"{cr_name[:keep].rstrip('-.')}-{_short_hash(cr_name)}-{stage}"


def label_value(cr_name: str) -> str:
    """A label value (<= 63 chars) identifying the DistillationJob; hashed when the name is longer."""
    if len(cr_name) <= 63:
        return cr_name
    return f"{cr_name[:54].rstrip('-.')}-{_short_hash(cr_name)}"


def labels(owner: Owner, stage: str) -> dict[str, str]:
    """The recommended app.kubernetes.io/* labels plus the job's name (hashed when long), uid and stage."""
    from nnunet_distill_operator import __version__

    out = {
        "app.kubernetes.io/name": "nnunet-distill-trainer",
        "app.kubernetes.io/instance": label_value(owner.name),
        "app.kubernetes.io/part-of": "nnunet-distill",
        "app.kubernetes.io/version": label_value(re.sub(r"[^A-Za-z0-9_.-]", "-", __version__)),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/component": stage,
        LABEL_JOB: label_value(owner.name),
        LABEL_STAGE: stage,
    }
    if owner.uid:
        out[LABEL_JOB_UID] = owner.uid
    return out


def guard_script(stage: Stage) -> str | None:
    """/bin/sh that exits 0 when the stage's outputs exist and otherwise execs the command ("$@").

    Globs are expanded by the shell; `present` is true when any match exists. For indexed stages the
    pod's $JOB_COMPLETION_INDEX selects the index value the globs refer to.
    """
    if not stage.done_when_exists:
        return None
    lines = ['present() { for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }']
    if stage.index_values:
        cases = " ".join(f"{i}) v={shlex.quote(v)} ;;" for i, v in enumerate(stage.index_values))
        lines.append(f'case "${{JOB_COMPLETION_INDEX:-0}}" in {cases} *) exec "$@" ;; esac')
    checks = " && ".join(f"present {p.replace('{value}', '$v')}" for p in stage.done_when_exists)
    what = f"{stage.name}" + (" (index value $v)" if stage.index_values else "")
    lines.append(
        f'if {checks}; then echo "nnunet-distill: {what} outputs already present; skipping"; exit 0; fi'
    )
    lines.append('exec "$@"')
    return "\n".join(lines)


def container_command(stage: Stage, argv: tuple[str, ...], guarded: bool) -> list[str]:
    script = guard_script(stage) if guarded else None
    if script is None:
        return list(argv)
    return ["/bin/sh", "-c", script, "nnunet-distill-guard", *argv]


def _env(owner: Owner, stage: Stage, paths: DataPaths, spec: api.DistillationJobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in paths.env().items()]
    required = dict(stage.required_env)
    env += [{"name": k, "value": v} for k, v in stage.env if k not in required]
    env += [{"name": k, "value": v} for k, v in stage.required_env]
    env += [
        {
            "name": ENV_JOB_NAME,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_JOB_NAME}']"}},
        },
        {"name": ENV_JOB_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {
            "name": ENV_JOB_UID,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_JOB_UID}']"}},
        },
        {"name": ENV_JOB_STAGE, "value": stage.name},
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if stage.uses_credentials and spec.output is not None and spec.output.secret_ref is not None:
        scheme = spec.output.uri.split("://", 1)[0]
        for var, required in CREDENTIAL_ENV.get(scheme, ()):
            ref: dict[str, Any] = {"name": spec.output.secret_ref.name, "key": var}
            if not required:
                ref["optional"] = True
            env.append({"name": var, "valueFrom": {"secretKeyRef": ref}})
    return env


def _volumes(
    spec: api.DistillationJobSpec, stage: Stage
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container mounts): one volume per distinct claim, sub-paths per folder."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    claims: dict[str, str] = {}
    folders = {"raw": api.MOUNT_RAW, "preprocessed": api.MOUNT_PREPROCESSED, "results": api.MOUNT_RESULTS}
    for folder, mount_path in folders.items():
        vol = spec.storage.volume(folder)  # type: ignore[arg-type]
        if vol is None:
            continue
        if vol.claim_name not in claims:
            claims[vol.claim_name] = f"data-{len(claims)}"
            volumes.append(
                {"name": claims[vol.claim_name], "persistentVolumeClaim": {"claimName": vol.claim_name}}
            )
        mount: dict[str, Any] = {"name": claims[vol.claim_name], "mountPath": mount_path}
        if vol.sub_path:
            mount["subPath"] = vol.sub_path
        if vol.read_only or (folder == "raw" and stage.name != "preprocess"):
            mount["readOnly"] = True
        mounts.append(mount)
    volumes.append(
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}}
    )
    volumes.append({"name": "tmp", "emptyDir": {}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    return volumes, mounts


def _resources(spec: api.DistillationJobSpec, stage: Stage) -> dict[str, Any]:
    r = stage.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if r.cpu is not None:
        requests["cpu"] = limits["cpu"] = r.cpu
    if r.memory is not None:
        requests["memory"] = limits["memory"] = r.memory
    if r.gpus:
        # Extended resources are limits (requests default to them); the API wants quantity strings.
        limits[spec.resources.gpu_resource_name] = str(r.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _security(spec: api.DistillationJobSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    pod: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": spec.security.run_as_user,
        "runAsGroup": spec.security.run_as_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if spec.security.fs_group is not None:
        pod["fsGroup"] = spec.security.fs_group
        pod["fsGroupChangePolicy"] = "OnRootMismatch"
    container = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    return pod, container


def job_for(
    stage: Stage,
    *,
    owner: Owner,
    spec: api.DistillationJobSpec,
    paths: DataPaths,
    defaults: Defaults = Defaults(),
    suspend: bool = False,
) -> dict[str, Any]:
    """The batch/v1 Job running `stage` for `owner`. `suspend` creates it suspended (spec.suspend)."""
    name = job_name(owner.name, stage.name)
    job_labels = labels(owner, stage.name)
    queued = spec.scheduling.queue_name is not None
    if queued:
        job_labels[KUEUE_QUEUE_LABEL] = spec.scheduling.queue_name  # type: ignore[assignment]
    annotations = {ANNOTATION_JOB_NAME: owner.name, ANNOTATION_JOB_UID: owner.uid}
    job_spec = _job_spec(stage, spec, _pod_spec(stage, owner, spec, paths, defaults))
    job_spec["template"]["metadata"] = {"labels": labels(owner, stage.name), "annotations": dict(annotations)}
    if suspend or queued:
        # Kueue admits a queued Job by un-suspending it; it must be created suspended.
        job_spec["suspend"] = True

    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": job_labels,
            "annotations": dict(annotations),
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": job_spec,
    }
    # Several nodes: Indexed, all pods at once, a subdomain for the rendezvous Service (distributed.py).
    return with_rendezvous(job, stage.resources.gpus, stage.resources.nodes)


def _containers(
    stage: Stage,
    owner: Owner,
    spec: api.DistillationJobSpec,
    paths: DataPaths,
    defaults: Defaults,
    mounts: list[dict[str, Any]],
    container_security: dict[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(init containers, main container): earlier commands of a stage run as init containers (in order,
    each only after the previous one succeeded); the last is the main container, whose termination message
    the operator reads."""
    env = _env(owner, stage, paths, spec)
    image = spec.image or defaults.image
    pull_policy = spec.image_pull_policy or defaults.image_pull_policy

    def container(name: str, argv: tuple[str, ...], guarded: bool, shared: bool) -> dict[str, Any]:
        own = (lambda tree: tree) if shared else copy_tree  # later containers copy: no YAML aliases
        c: dict[str, Any] = {
            "name": name,
            "image": image,
            # `args`, not `command`: the image's ENTRYPOINT (tini in the trainer image) stays PID 1, reaps the
            # data loader workers and forwards the kubelet's SIGTERM, on which the trainer saves a checkpoint.
            "args": container_command(stage, argv, guarded),
            "env": own(env),
            "resources": _resources(spec, stage),
            "volumeMounts": own(mounts),
            "securityContext": own(container_security),
            "terminationMessagePath": TERMINATION_MESSAGE_PATH,
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
        if pull_policy:
            c["imagePullPolicy"] = pull_policy
        return c

    init = [container(c.name, c.argv, False, shared=i == 0) for i, c in enumerate(stage.commands[:-1])]
    main = container(CONTAINER_MAIN, stage.argv, True, shared=not init)
    if init and stage.done_when_exists:
        # The guard must also protect the preparation steps: guard the first one instead.
        init[0]["args"] = container_command(stage, stage.commands[0].argv, guarded=True)
        main["args"] = list(stage.argv)
    return init, main


def _pod_spec(
    stage: Stage, owner: Owner, spec: api.DistillationJobSpec, paths: DataPaths, defaults: Defaults
) -> dict[str, Any]:
    volumes, mounts = _volumes(spec, stage)
    pod_security, container_security = _security(spec)
    init, main = _containers(stage, owner, spec, paths, defaults, mounts, container_security)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": pod_security,
        "containers": [main],
        "volumes": volumes,
        "enableServiceLinks": False,
    }
    if init:
        pod_spec["initContainers"] = init
    # Only the stages that report progress get a token; the identity can do nothing but get/patch the status
    # of this one DistillationJob (trainer_identity).
    pod_spec["serviceAccountName"] = trainer_service_account(owner, spec, defaults)
    pod_spec["automountServiceAccountToken"] = stage.reports_progress
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    sched = spec.scheduling
    if sched.node_selector:
        pod_spec["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.affinity:
        pod_spec["affinity"] = sched.affinity
    if sched.priority_class_name:
        pod_spec["priorityClassName"] = sched.priority_class_name
    return pod_spec


def _failure_policy(stage: Stage) -> dict[str, Any]:
    """Evictions, preemptions and node drains are not the trainer's fault: they do not count towards
    backoffLimit (the pod is recreated and resumes from its checkpoint). Usage errors (exit 2) fail at once,
    since a retry runs the same wrong command; so do a stage's deterministic verdicts (the quality gate's
    "failed", exit 3: a retry would judge the same student the same way)."""
    rules: list[dict[str, Any]] = [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [EXIT_CODE_USAGE]}},
    ]
    if stage.fail_fast_exit_codes:
        codes = sorted(stage.fail_fast_exit_codes)
        rules.append(
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER_MAIN, "operator": "In", "values": codes},
            }
        )
    return {"rules": rules}


def _job_spec(stage: Stage, spec: api.DistillationJobSpec, pod_spec: dict[str, Any]) -> dict[str, Any]:
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "completions": stage.completions,
        "parallelism": stage.completions,
        "podFailurePolicy": _failure_policy(stage),
        "template": {"metadata": {}, "spec": pod_spec},
    }
    job_spec["ttlSecondsAfterFinished"] = spec.job_ttl_seconds_after_finished
    if stage.index_values:
        job_spec["completionMode"] = "Indexed"
        if stage.completions > 1:
            # Each teacher fold gets its own retries (Kubernetes >= 1.29; beta, on by default). Older API
            # servers drop the field; backoffLimit, scaled by the folds, then bounds all folds' failures
            # together.
            job_spec["backoffLimitPerIndex"] = spec.backoff_limit
            job_spec["backoffLimit"] = spec.backoff_limit * stage.completions
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return job_spec


def trainer_service_account(
    owner: Owner, spec: api.DistillationJobSpec, defaults: Defaults = Defaults()
) -> str:
    """The stage pods' ServiceAccount: the spec's, else the operator's default, else the job's own."""
    return spec.service_account_name or defaults.service_account or identity_name(owner.name)


def identity_name(cr_name: str) -> str:
    """Name of the per-job trainer ServiceAccount, Role and RoleBinding."""
    return job_name(cr_name, "trainer")


def pod_service_account(job: Mapping[str, Any]) -> str | None:
    """The ServiceAccount a Job's pods run under (what `operator_state.kept_job` keeps of the template)."""
    return (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get("serviceAccountName")


def trainer_identity(
    owner: Owner, spec: api.DistillationJobSpec, defaults: Defaults = Defaults()
) -> tuple[dict[str, Any], ...]:
    """The per-job least-privilege identity of the stage pods, owned by the DistillationJob: a ServiceAccount,
    a Role that allows only get/patch of this DistillationJob's status (resourceNames), and a RoleBinding.
    Empty when the spec (or the operator's configuration) names a ServiceAccount of its own."""
    if spec.service_account_name or defaults.service_account:
        return ()
    name = identity_name(owner.name)

    def meta() -> dict[str, Any]:  # a fresh one per object: they must not share dicts
        return {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels(owner, "trainer"),
            "annotations": {ANNOTATION_JOB_NAME: owner.name, ANNOTATION_JOB_UID: owner.uid},
            "ownerReferences": [owner_reference(owner)],
        }

    return (
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta(),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(),
            "rules": [
                {
                    "apiGroups": [api.GROUP],
                    "resources": [f"{api.PLURAL}/status"],
                    "resourceNames": [owner.name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
    )


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
