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
