"""Every kustomize overlay renders and each object validates against the Kubernetes schemas;
every Dockerfile passes hadolint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = sorted(p.parent for p in (ROOT / "manifests" / "overlays").glob("*/kustomization.yaml"))
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))
K8S_VERSION = "1.31.0"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _render(overlay: Path) -> list[dict]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_overlays_exist() -> None:
    names = {p.name for p in OVERLAYS}
    assert {"dev", "gpu-cluster"} <= names


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_objects_validate(overlay: Path) -> None:
    import kubernetes_validate

    docs = _render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "PriorityClass",
    } <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace" and doc["kind"] != "PriorityClass":
            assert doc["metadata"].get("namespace") == "patchgap", doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_launcher_config_uses_secret_ref_and_no_secret_values(overlay: Path) -> None:
    docs = _render(overlay)
    launcher = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher"
    )
    providers = yaml.safe_load(launcher["data"]["providers"])
    s3 = providers["s3"]["default"]
    assert s3["credentials"]["secretRef"]["secretName"] == "patchgap-s3"
    assert s3["forcePathStyle"] in (True, False)
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://")
    # No Secret objects with literal credentials are ever rendered from the repo.
    assert not [d for d in docs if d["kind"] == "Secret"]


def test_dev_overlay_runs_seaweedfs() -> None:
    docs = _render(ROOT / "manifests" / "overlays" / "dev")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "seaweedfs"), ("Service", "seaweedfs")} <= kinds
    assert ("PersistentVolumeClaim", "seaweedfs-data") in kinds
    launcher = next(d for d in docs if d["metadata"]["name"] == "kfp-launcher")
    assert "seaweedfs.patchgap.svc" in launcher["data"]["providers"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    res = subprocess.run(
        [_tool("hadolint"), "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_runs_as_non_root_and_holds_no_secrets(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = [ln.split()[1] for ln in text.splitlines() if ln.strip().startswith("USER ")]
    if dockerfile.parent.name != "base":
        # Stage images inherit the base's user and must end non-root too.
        assert not users or users[-1] not in ("root", "0")
    else:
        assert users and users[-1] not in ("root", "0")
    lowered = text.lower()
    for word in ("aws_secret_access_key=", "password=", "token="):
        assert word not in lowered


def test_runner_mounts_its_token_for_the_launcher_and_may_read_only_that() -> None:
    docs = _render(ROOT / "manifests" / "overlays" / "gpu-cluster")
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    # KFP's v2 launcher reads kfp-launcher and the S3 Secret through the API with this token.
    assert account["automountServiceAccountToken"] is True
    role = next(
        d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "patchgap-runner"
    )
    granted = {
        (res, name, verb)
        for rule in role["rules"]
        for res in rule["resources"]
        for name in rule.get("resourceNames", ["*"])
        for verb in rule["verbs"]
    }
    assert granted == {("configmaps", "kfp-launcher", "get"), ("secrets", "patchgap-s3", "get")}
    assert (ROOT / "manifests" / "README.md").is_file()  # the base kustomization points to it


def test_namespace_enforces_baseline_and_reports_restricted() -> None:
    docs = _render(ROOT / "manifests" / "overlays" / "dev")
    labels = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"


def test_dev_store_is_hardened_and_reachable_only_from_pipeline_pods_on_s3() -> None:
    docs = _render(ROOT / "manifests" / "overlays" / "dev")
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert [p["containerPort"] for p in container["ports"]] == [8333]
    service = next(d for d in docs if d["kind"] == "Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [8333]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "seaweedfs"}
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8333}]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}}
    ]
