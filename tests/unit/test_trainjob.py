"""The multi-node step's TrainJob and the shipped Trainer manifests against the published CRD
schemas of Kubeflow Trainer v2.3.0 (tests/assets/kubeflow-trainer), the RBAC against Kubernetes'
own schemas, and the follow loop on recorded API responses built from the kubernetes client's
models. Nothing here reaches a cluster."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from patchgap.errors import ConfigError
from patchgap.kfp import trainjob as tj

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "tests" / "assets" / "kubeflow-trainer"
TRAINER_MANIFESTS = ROOT / "manifests" / "trainer"


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused: the API server prunes them silently, so a
    misspelt field would vanish instead of failing; here it fails."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _schema(kind_file: str) -> dict[str, Any]:
    crd = yaml.safe_load(gzip.open(CRDS / f"trainer.kubeflow.org_{kind_file}.yaml.gz"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == tj.VERSION]
    assert version["served"] and version["storage"]
    return _strict(version["schema"]["openAPIV3Schema"])


def _validate(obj: dict[str, Any], kind_file: str) -> None:
    import jsonschema

    jsonschema.validate(obj, _schema(kind_file))


PLACEMENT = tj.Placement(
    accelerator_type="nvidia.com/gpu",
    accelerator_count=8,
    node_selector={"nvidia.com/gpu.present": "true"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
)


def _job(**kw: Any) -> dict[str, Any]:
    from patchgap.stages import train_rewriter as tr

    section = tr.Config(nodes=2).model_dump(mode="json")
    args: dict[str, Any] = {
        "stage": "train_rewriter",
        "name": tj.job_name("train_rewriter", "s3://b/run/adapter"),
        "namespace": "patchgap",
        "image": "ghcr.io/patchgap/patchgap-train-rewriter:0.1.0",
        "config": section,
        "nodes": 2,
        "inputs": {"dataset": "s3://b/run/dataset"},
        "outputs": {"adapter": "s3://b/run/adapter.trainjob", "metrics": "s3://b/run/m.trainjob"},
        "placement": PLACEMENT,
    }
    args.update(kw)
    return tj.build_trainjob(**args)


def test_the_trainjob_validates_against_the_trainer_crd() -> None:
    job = _job()
    _validate(job, "trainjobs")
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numProcsPerNode"] = 8  # a misspelt field is caught, not pruned
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="numProcsPerNode"):
        _validate(bad, "trainjobs")


def test_the_trainjob_runs_the_stage_under_torchrun_placed_like_a_single_pod_step() -> None:
    job = _job()
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == tj.RUNTIME == "patchgap-torch"
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": "8"}}
    script = trainer["command"][2]
    assert "exec torchrun -m patchgap.stages.train_rewriter --config" in script
    assert trainer["args"] == [
        "--input",
        "dataset=s3://b/run/dataset",
        "--output",
        "adapter=s3://b/run/adapter.trainjob",
        "--output",
        "metrics=s3://b/run/m.trainjob",
    ]
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["containers"][0]["name"] == "node"
    assert pod["nodeSelector"] == dict(PLACEMENT.node_selector or {})
    assert pod["tolerations"] == list(PLACEMENT.tolerations)
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    claim = volumes[mounts["/cache"]]["persistentVolumeClaim"]["claimName"]
    assert claim == "patchgap-model-cache"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_credentials_are_references_never_values() -> None:
    env = {e["name"]: e for e in _job()["spec"]["trainer"]["env"]}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        assert "value" not in env[name]
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is True and ref["name"] in ("patchgap-s3", "patchgap-hf")
    endpoint = env["AWS_ENDPOINT_URL_S3"]["valueFrom"]["configMapKeyRef"]
    assert endpoint["name"] == "patchgap-s3-config"


def test_the_nodes_read_the_same_stage_config_with_one_node(tmp_path: Path) -> None:
    from patchgap.stages import train_rewriter as tr
    from patchgap.stages.base import load_stage_config

    env = {e["name"]: e for e in _job()["spec"]["trainer"]["env"]}
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(env[tj.CONFIG_ENV]["value"])
    config = load_stage_config(tr.Config, run_yaml, "train_rewriter")
    assert config.nodes == 1  # the nodes train; they never start another TrainJob
    assert config.model_copy(update={"nodes": 2}) == tr.Config(nodes=2)


def test_placement_names_match_the_single_pod_steps() -> None:
    from patchgap.pipelines import placement as p

    for name in ("S3_SECRET", "S3_CONFIG_MAP", "HF_SECRET", "MODEL_CACHE_PVC", "SHM_SIZE"):
        assert getattr(tj, name) == getattr(p, name), name
    assert tj.MODEL_CACHE_PATH == p.MODEL_CACHE_PATH


def test_bad_requests_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError, match="^train_rewriter: nodes=1: a TrainJob is for 2 or more"):
        _job(nodes=1)
    with pytest.raises(ConfigError, match="through S3 only; not s3://: adapter=/tmp/a"):
        _job(outputs={"adapter": "/tmp/a"})
    with pytest.raises(ConfigError, match="needs an S3 pipeline root"):
        tj.s3_uri("gs://b/x", "sft output model")
    assert tj.s3_uri("minio://mlpipeline/v2/x", "x") == "s3://mlpipeline/v2/x"
    with pytest.raises(ConfigError, match=r"component sft: nodes: Input should be greater"):
        tj.nodes_of("sft", '{"nodes": 0}')
    assert tj.nodes_of("sft", '{"nodes": 3}') == 3 and tj.nodes_of("train_rewriter", "{}") == 1


def test_nodes_is_not_part_of_a_training_runs_identity() -> None:
    from patchgap.stages import sft
    from patchgap.stages import train_rewriter as tr

    assert tr.fingerprint(tr.Config()) == tr.fingerprint(tr.Config(nodes=4))
    assert "nodes" in sft.NOT_IN_FINGERPRINT and "nodes" in tr.NOT_IN_FINGERPRINT


def test_job_names_are_stable_short_dns_labels() -> None:
    import re

    a = tj.job_name("train_rewriter", "s3://b/run1/adapter")
    assert a == tj.job_name("train_rewriter", "s3://b/run1/adapter")  # a retry adopts it
    assert a != tj.job_name("train_rewriter", "s3://b/run2/adapter")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a) and len(a) <= 40


# ------------------------------------------------------------------ the shipped manifests


def _manifest_objects() -> list[dict[str, Any]]:
    out = []
    for path in sorted(TRAINER_MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            out += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def test_the_runtime_validates_and_is_the_one_the_trainjob_names() -> None:
    (runtime,) = [o for o in _manifest_objects() if o["kind"] == "ClusterTrainingRuntime"]
    _validate(runtime, "clustertrainingruntimes")
    assert runtime["metadata"]["name"] == tj.RUNTIME
    assert "namespace" not in runtime["metadata"]  # cluster-scoped
    assert "torch" in runtime["spec"]["mlPolicy"]
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == tj.NODE
    labels = job["template"]["metadata"]["labels"]
    assert labels["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert job["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == tj.NODE


def test_the_rbac_validates_and_grants_trainjobs_only() -> None:
    import kubernetes_validate

    objects = [o for o in _manifest_objects() if o["kind"] in ("Role", "RoleBinding")]
    assert sorted(o["kind"] for o in objects) == ["Role", "RoleBinding"]
    for obj in objects:
        kubernetes_validate.validate(obj, "1.33.0", strict=True)
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert role["rules"] == [
        {
            "apiGroups": ["trainer.kubeflow.org"],
            "resources": ["trainjobs"],
            "verbs": ["create", "get", "list", "watch", "delete"],
        }
    ]
    assert {o["metadata"]["namespace"] for o in objects} == {"patchgap"}
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "patchgap-runner", "namespace": "patchgap"}
    ]


# ------------------------------------------------------------------------- the follow loop


def _condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    from datetime import datetime, timezone

    from kubernetes.client import ApiClient, V1Condition

    c = V1Condition(
        type=kind,
        status="True",
        reason=reason,
        message=message,
        last_transition_time=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    return ApiClient().sanitize_for_serialization(c)


def _recorded(body: dict[str, Any], status: dict[str, Any] | None) -> dict[str, Any]:
    obj = copy.deepcopy(body)
    obj["metadata"].update({"uid": "0f0e", "resourceVersion": "1", "generation": 1})
    if status is not None:
        obj["status"] = status
    return obj


class RecordedApi:
    """CustomObjectsApi's two calls the step makes, answering from a recorded sequence; an
    ``ApiException`` in the sequence is raised as the client raises it."""

    def __init__(self, answers: list[Any], create: Any = None) -> None:
        self.answers = list(answers)
        self.create = create
        self.calls: list[tuple[str, ...]] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):  # type: ignore[no-untyped-def]
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        if isinstance(self.create, Exception):
            raise self.create
        return body

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):  # type: ignore[no-untyped-def]
        self.calls.append(("delete", group, version, namespace, plural, name))
        self.create = None  # the next create succeeds
        return {}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):  # type: ignore[no-untyped-def]
        self.calls.append(("get", group, version, namespace, plural, name))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _sequence(*statuses: dict[str, Any] | None) -> list[dict[str, Any]]:
    body = _job()
    return [_recorded(body, s) for s in statuses]


RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "failed": 0, "succeeded": 0}]}


def _follow(api: RecordedApi, **kw: Any) -> tuple[tj.JobState, list[tj.JobState], list[float]]:
    seen: list[tj.JobState] = []
    slept: list[float] = []
    name = _job()["metadata"]["name"]
    state = tj.follow(
        api, name, "patchgap", poll_seconds=5, sleep=slept.append, report=seen.append, **kw
    )
    return state, seen, slept


def test_follow_created_running_succeeded() -> None:
    complete = {
        "conditions": [_condition("Complete", "JobsCompleted", "jobs completed")],
        **RUNNING,
    }
    api = RecordedApi(_sequence(None, RUNNING, RUNNING, complete))
    state, seen, slept = _follow(api)
    assert state.phase == "Complete"
    assert [s.phase for s in seen] == ["Running", "Running", "Complete"]  # created, 2 active, done
    assert seen[0].message == "created" and seen[1].message == "2 node job(s) active"
    assert slept == [5, 5, 5]
    assert {c[1:5] for c in api.calls} == {
        ("trainer.kubeflow.org", "v1alpha1", "patchgap", "trainjobs")
    }


def test_follow_failed_is_one_line_with_the_reason_and_the_logs() -> None:
    failed = {"conditions": [_condition("Failed", "JobFailed", "job node-0 failed:\n exit 1")]}
    api = RecordedApi(_sequence(None, RUNNING, failed))
    with pytest.raises(tj.TrainJobError) as err:
        _follow(api)
    text = str(err.value)
    assert "\n" not in text
    assert "failed: JobFailed: job node-0 failed: exit 1" in text
    assert "(logs: kubectl -n patchgap logs -l jobset.sigs.k8s.io/jobset-name=pg-" in text


def test_follow_deleted_job_fails_the_step() -> None:
    from kubernetes.client.exceptions import ApiException

    api = RecordedApi([*_sequence(None, RUNNING), ApiException(status=404, reason="Not Found")])
    with pytest.raises(
        tj.TrainJobError, match=r"^TrainJob patchgap/pg-train-rewriter-\w+ was deleted$"
    ):
        _follow(api)


def test_follow_gives_up_after_its_timeout() -> None:
    api = RecordedApi(_sequence(None, RUNNING, RUNNING, RUNNING))
    with pytest.raises(tj.TrainJobError, match="still Running after 10 s"):
        _follow(api, timeout_seconds=10)


def test_a_retried_step_adopts_its_job_and_other_refusals_are_one_line() -> None:
    from kubernetes.client.exceptions import ApiException

    body = _job()
    conflict = ApiException(status=409, reason="Conflict")
    api = RecordedApi(_sequence(RUNNING), create=conflict)
    assert tj.create_or_adopt(api, body)["status"] == RUNNING
    assert [c[0] for c in api.calls] == ["create", "get"]

    # A job that failed in the earlier try is replaced, so the retry trains again.
    failed = {"conditions": [_condition("Failed", "JobFailed", "node-0 exited 1")]}
    gone = ApiException(status=404, reason="Not Found")
    api = RecordedApi([*_sequence(failed, RUNNING), gone], create=conflict)
    assert tj.create_or_adopt(api, body, sleep=lambda s: None) == body
    assert [c[0] for c in api.calls] == ["create", "get", "delete", "get", "get", "create"]

    forbidden = ApiException(status=403, reason="Forbidden")
    forbidden.body = json.dumps({"message": 'trainjobs is forbidden: User "x" cannot create'})
    with pytest.raises(tj.TrainJobError, match=r"create refused \(403 Forbidden\): trainjobs is"):
        tj.create_or_adopt(RecordedApi([], create=forbidden), body)


def test_the_trainer_kustomization_renders_the_runtime_cluster_scoped() -> None:
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(TRAINER_MANIFESTS)], capture_output=True, text=True, check=True
    ).stdout
    objects = {o["kind"]: o for o in yaml.safe_load_all(out) if o}
    assert sorted(objects) == ["ClusterTrainingRuntime", "Role", "RoleBinding"]
    assert "namespace" not in objects["ClusterTrainingRuntime"]["metadata"]
