"""A training stage past one node: the Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/
v1alpha1``) that runs it, and the pipeline step's follow loop.

With ``nodes: N`` (N > 1) in the train_rewriter or sft section, the pipeline's training step does
not train in its own pod: it builds a TrainJob (:func:`build_trainjob`) on the
``patchgap-torch`` ClusterTrainingRuntime (manifests/trainer), whose torch plugin sets torchrun's
``PET_*`` variables on every node; torchrun then starts ``python -m patchgap.stages.<stage>`` once
per GPU with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``, the stage
trains in place (patchgap.training.launch does not re-launch under torchrun) and global rank 0
uploads the outputs with their manifests (patchgap.stages.base.execute). The step follows the job
(:func:`follow`) until it completes or fails, then fetches the outputs from S3 into its own output
artifacts, as a single-pod step's outputs are. We write no distributed runtime: Trainer's
controller, JobSet and torchrun do the work.

Placement mirrors the single-pod steps (patchgap.pipelines.placement, whose names are repeated
here because the pipelines layer sits above this one): the GPU pool's node selector, tolerations
and accelerator count, a memory-backed /dev/shm, the model cache claim, the S3 Secret and
ConfigMap as optional environment references (never literal credentials), user 1000.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchgap.errors import ConfigError, PatchgapError
from patchgap.kfp.images import image_for

log = logging.getLogger("patchgap.kfp.trainjob")

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
#: The ClusterTrainingRuntime shipped in manifests/trainer (torch, torchrun).
RUNTIME = "patchgap-torch"
#: The runtime's replicated job and container that run the trainer on every node.
NODE = "node"
#: Who owns the runtime patch (the field is required and keys the patches).
PATCH_MANAGER = "patchgap.io/pipeline"

# Kept equal to patchgap.pipelines.placement (a unit test compares them).
S3_SECRET = "patchgap-s3"
S3_CONFIG_MAP = "patchgap-s3-config"
HF_SECRET = "patchgap-hf"
MODEL_CACHE_PVC = "patchgap-model-cache"
MODEL_CACHE_PATH = "/cache"
SHM_SIZE = "16Gi"

#: The stage config travels in this variable; the node's shell writes it to a file for --config.
CONFIG_ENV = "PATCHGAP_STAGE_CONFIG"
_CONFIG_FILE = "${TMPDIR:-/tmp}/patchgap-stage.yaml"
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class TrainJobError(PatchgapError):
    """The TrainJob failed, was deleted, or could not be created or read."""


@dataclass(frozen=True)
class Placement:
    """Where each node runs: the pipeline's GPU-pool parameters."""

    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1
    node_selector: Mapping[str, str] | None = None
    tolerations: Sequence[Mapping[str, Any]] = ()


def job_name(stage: str, key: str) -> str:
    """A DNS-1035 name fixed by ``key`` (the step's output URI): a retried step pod finds the job
    its earlier try created instead of starting a second one. Short, because JobSet derives pod
    host names (``<name>-node-0-0.<name>``) from it."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"pg-{stage.replace('_', '-')}-{digest}"


def _env_from(name: str, key: str, kind: str) -> dict[str, Any]:
    ref = "secretKeyRef" if kind == "secret" else "configMapKeyRef"
    return {"name": name, "valueFrom": {ref: {"name": key, "key": name, "optional": True}}}


def node_env(config_text: str) -> list[dict[str, Any]]:
    """The stage config, and S3 and hub settings as references to the Secret and ConfigMap."""
    return [
        {"name": CONFIG_ENV, "value": config_text},
        _env_from("AWS_ACCESS_KEY_ID", S3_SECRET, "secret"),
        _env_from("AWS_SECRET_ACCESS_KEY", S3_SECRET, "secret"),
        _env_from("AWS_ENDPOINT_URL_S3", S3_CONFIG_MAP, "configmap"),
        _env_from("AWS_REGION", S3_CONFIG_MAP, "configmap"),
        _env_from("HF_TOKEN", HF_SECRET, "secret"),
    ]


def node_command(stage: str) -> list[str]:
    """torchrun around the stage's entrypoint; the shell first writes the config file (torchrun
    takes its node count, rank and rendezvous from the runtime's ``PET_*`` variables)."""
    script = (
        f'printf "%s" "${CONFIG_ENV}" > "{_CONFIG_FILE}" && '
        f'exec torchrun -m patchgap.stages.{stage} --config "{_CONFIG_FILE}" "$@"'
    )
    return ["sh", "-c", script, "torchrun"]


def stage_args(inputs: Mapping[str, str], outputs: Mapping[str, str]) -> list[str]:
    args: list[str] = []
    for name, uri in sorted(inputs.items()):
        args += ["--input", f"{name}={uri}"]
    for name, uri in sorted(outputs.items()):
        args += ["--output", f"{name}={uri}"]
    return args


def _pod_patch(placement: Placement) -> dict[str, Any]:
    """The node pods' placement, volumes and security context, as a runtime patch."""
    pod: dict[str, Any] = {
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True},
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": MODEL_CACHE_PVC}},
        ],
        "containers": [
            {
                "name": NODE,
                "volumeMounts": [
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "model-cache", "mountPath": MODEL_CACHE_PATH},
                ],
            }
        ],
    }
    if placement.node_selector:
        pod["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod["tolerations"] = [dict(t) for t in placement.tolerations]
    job = {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}},
    }


def build_trainjob(
    *,
    stage: str,
    name: str,
    namespace: str,
    image: str,
    config: Mapping[str, Any],
    nodes: int,
    inputs: Mapping[str, str],
    outputs: Mapping[str, str],
    placement: Placement,
) -> dict[str, Any]:
    """The TrainJob running ``stage`` with its section ``config`` on ``nodes`` nodes of
    ``placement.accelerator_count`` GPUs each, reading ``inputs`` and writing ``outputs``
    (``s3://`` URIs)."""
    if nodes < 2:
        raise ConfigError(f"{stage}: nodes={nodes}: a TrainJob is for 2 or more nodes")
    local = {n: u for n, u in {**inputs, **outputs}.items() if not u.startswith("s3://")}
    if local:
        raise ConfigError(
            f"{stage}: a TrainJob's nodes reach data through S3 only; not s3://: "
            + ", ".join(f"{n}={u}" for n, u in sorted(local.items()))
        )
    count = int(placement.accelerator_count)
    # The section travels as a run YAML (JSON is YAML) with the node count reset, so the stage
    # config the nodes validate is the one the single-pod step would run.
    text = json.dumps({stage: {**config, "nodes": 1}}, sort_keys=True)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "patchgap", "patchgap.io/stage": stage},
        },
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": RUNTIME},
            "trainer": {
                "image": image,
                "command": node_command(stage),
                "args": stage_args(inputs, outputs),
                "env": node_env(text),
                "numNodes": nodes,
                "numProcPerNode": max(count, 1),
                "resourcesPerNode": {"limits": {placement.accelerator_type: str(count)}}
                if count > 0
                else {},
            },
            "runtimePatches": [_pod_patch(placement)],
        },
    }


# ------------------------------------------------------------------------------- following


@dataclass(frozen=True)
class JobState:
    """Where a TrainJob stands: ``phase`` is Complete, Failed, Suspended or Running."""

    phase: str
    message: str


def job_state(obj: Mapping[str, Any]) -> JobState:
    """Read a TrainJob's state from its status conditions (Complete, Failed, Suspended)."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    true = {c.get("type"): c for c in conditions if str(c.get("status")) == "True"}
    for phase in ("Failed", "Complete", "Suspended"):
        if phase in true:
            c = true[phase]
            reason = c.get("reason") or ""
            text = " ".join(str(c.get("message") or "").split())
            return JobState(phase, f"{reason}: {text}" if reason and text else reason or text)
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    active = sum(int(j.get("active") or 0) for j in jobs)
    return JobState("Running", f"{active} node job(s) active" if jobs else "created")


def logs_hint(name: str, namespace: str) -> str:
    """Where the nodes' logs are (the JobSet controller labels the pods with the job's name)."""
    return f"kubectl -n {namespace} logs -l jobset.sigs.k8s.io/jobset-name={name} -c {NODE}"


def create_or_adopt(
    api: Any, body: Mapping[str, Any], sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """Create the TrainJob. One that already exists (a retried step) is followed, not replaced,
    unless it failed: then it is deleted and created again, so the retry trains (resuming from
    the checkpoints) instead of reporting the old failure."""
    from kubernetes.client.exceptions import ApiException

    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    for _ in range(2):
        try:
            return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except ApiException as err:
            if err.status != 409:
                raise TrainJobError(_api_error("create", name, err)) from None
        existing = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if job_state(existing).phase != "Failed":
            log.info("TrainJob %s exists (an earlier try of this step): following it", name)
            return existing
        log.info("TrainJob %s failed in an earlier try of this step: deleting it", name)
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        _wait_gone(api, name, namespace, sleep)
    raise TrainJobError(f"TrainJob {namespace}/{name}: still there after deleting it")


def _wait_gone(api: Any, name: str, namespace: str, sleep: Callable[[float], None]) -> None:
    from kubernetes.client.exceptions import ApiException

    for _ in range(60):
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return
            raise TrainJobError(_api_error("get", name, err)) from None
        sleep(2.0)
    raise TrainJobError(f"TrainJob {namespace}/{name}: not gone 120 s after deleting it")


def _api_error(action: str, name: str, err: Any) -> str:
    body = str(getattr(err, "body", "") or "")
    try:
        body = json.loads(body).get("message", body)
    except (ValueError, AttributeError):
        pass
    return (
        f"TrainJob {name}: {action} refused ({err.status} {err.reason}): {' '.join(body.split())}"
    )


def follow(
    api: Any,
    name: str,
    namespace: str,
    *,
    poll_seconds: float = 30.0,
    timeout_seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    report: Callable[[JobState], None] | None = None,
) -> JobState:
    """Poll the TrainJob until it completes; a failed, deleted or (with ``timeout_seconds``)
    overdue job raises :class:`TrainJobError` with one line saying why. ``report`` sees each
    change of state (the step logs it)."""
    from kubernetes.client.exceptions import ApiException

    waited, last = 0.0, None
    where = logs_hint(name, namespace)
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                raise TrainJobError(f"TrainJob {namespace}/{name} was deleted") from None
            raise TrainJobError(_api_error("get", name, err)) from None
        state = job_state(obj)
        if state != last:
            (report or _log_state)(state)
            last = state
        if state.phase == "Complete":
            return state
        if state.phase == "Failed":
            raise TrainJobError(
                f"TrainJob {namespace}/{name} failed: {state.message or 'no reason given'} "
                f"(logs: {where})"
            )
        if timeout_seconds is not None and waited >= timeout_seconds:
            raise TrainJobError(
                f"TrainJob {namespace}/{name} still {state.phase} after {waited:.0f} s "
                f"(logs: {where})"
            )
        sleep(poll_seconds)
        waited += poll_seconds


def _log_state(state: JobState) -> None:
    log.info("TrainJob: %s%s", state.phase, f" ({state.message})" if state.message else "")


def own_namespace(default: str = "patchgap") -> str:
    """The namespace the step's pod runs in (its service account's), else ``default``."""
    try:
        return _NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def s3_uri(uri: str, what: str) -> str:
    """A KFP artifact URI as the store reads it (KFP writes MinIO roots as ``minio://``)."""
    if uri.startswith("minio://"):
        return "s3://" + uri.removeprefix("minio://")
    if not uri.startswith("s3://"):
        raise ConfigError(
            f"{what}: {uri!r}: a multi-node step needs an S3 pipeline root (s3:// or minio://)"
        )
    return uri


# ------------------------------------------------------------------------------- the step


def nodes_of(stage: str, config_text: str, overrides: list[str] | None = None) -> int:
    """The ``nodes`` setting of a component's ``config`` text (validated as the stage does)."""
    from patchgap.config import apply_overrides, safe_load_yaml, validate
    from patchgap.stages.base import stage_module

    data = safe_load_yaml(config_text, f"component {stage} config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"component {stage}: config must be a mapping")
    module = stage_module(stage)
    cfg = validate(module.Config, apply_overrides(data, overrides), f"component {stage}")
    return int(getattr(cfg, "nodes", 1))


def _kubernetes_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def run_on_trainjob(
    stage: str,
    config_text: str,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    *,
    image: str,
    placement: Placement,
    metrics: Any | None = None,
    api: Any | None = None,
    poll_seconds: float = 30.0,
) -> dict[str, float]:
    """The multi-node training step: build the TrainJob, follow it to its end, then fetch the
    outputs its rank 0 wrote to S3 into the step's artifacts and log the stage's figures.
    Artifacts are duck-typed (``.uri``, ``.path``); ``None`` is an optional input not wired."""
    import shutil
    import tempfile

    from patchgap.config import safe_load_yaml
    from patchgap.logs import setup_logging
    from patchgap.storage.store import Store, fetch_to_local

    setup_logging()
    section = safe_load_yaml(config_text, f"component {stage} config") or {}
    nodes = nodes_of(stage, config_text)
    ins = {n: s3_uri(str(a.uri), f"{stage} input {n}") for n, a in inputs.items() if a is not None}
    outs = {
        n: s3_uri(str(a.uri), f"{stage} output {n}").rstrip("/") + ".trainjob"
        for n, a in outputs.items()
    }
    name = job_name(stage, next(iter(sorted(outs.values()))))
    namespace = own_namespace()
    body = build_trainjob(
        stage=stage,
        name=name,
        namespace=namespace,
        image=image,
        config=section,
        nodes=nodes,
        inputs=ins,
        outputs=outs,
        placement=placement,
    )
    api = api if api is not None else _kubernetes_api()
    create_or_adopt(api, body)
    log.info(
        "%s: TrainJob %s/%s on %d nodes; logs: %s",
        stage,
        namespace,
        name,
        nodes,
        logs_hint(name, namespace),
    )
    follow(api, name, namespace, poll_seconds=poll_seconds)

    store = Store.from_env()
    figures: dict[str, float] = {}
    for n, uri in outs.items():
        manifest = store.read_manifest(uri)
        if manifest is None:
            raise TrainJobError(f"TrainJob {name} completed but wrote no complete output {uri}")
        figures = dict((manifest.metadata or {}).get("metrics") or figures)
        with tempfile.TemporaryDirectory(prefix=f"patchgap-{stage}-") as tmp:
            local = fetch_to_local(uri, Path(tmp))
            shutil.copytree(local, outputs[n].path, dirs_exist_ok=True)
    if metrics is not None:
        for key, value in sorted(figures.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(float(value)):
                    metrics.log_metric(key, float(value))
    return figures


def run_training_step(
    stage: str,
    config_text: str,
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    metrics: Any | None,
    *,
    image: str,
    accelerator_type: str,
    accelerator_count: int,
    node_selector: Mapping[str, str] | None,
    tolerations: Sequence[Mapping[str, Any]] | None,
) -> None:
    """A training component's body: the stage in this pod, or, with ``nodes`` above 1 in its
    config, a TrainJob placed as the single-pod step would be (``image`` empty: this stage's)."""
    from patchgap.stages.base import run_component  # deferred as in nodes_of

    if nodes_of(stage, config_text) > 1:
        placement = Placement(accelerator_type, accelerator_count, node_selector, tolerations or ())
        run_on_trainjob(
            stage,
            config_text,
            inputs,
            outputs,
            image=image or image_for(stage),
            placement=placement,
            metrics=metrics,
        )
        return
    run_component(stage, config_text, inputs, outputs, metrics)
