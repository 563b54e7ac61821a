"""``patchgap doctor`` checks S3, the bucket and the KFP host before any GPU time is spent."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from patchgap.cli.main import cli
from patchgap.kfp import client as cluster

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_PATH = "/api/v1/namespaces/patchgap/configmaps/kfp-launcher"


def _by_name(checks: list[cluster.Check]) -> dict[str, cluster.Check]:
    return {c.name: c for c in checks}


@pytest.fixture
def fake_kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, dict]]:
    """A loopback Kubernetes API serving the objects put in the returned dict (by API path) and
    404 for anything else, with a kubeconfig pointing at it."""
    objects: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
            body = objects.get(self.path.split("?")[0])
            code = 200 if body is not None else 404
            if body is None:
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
                body |= {"reason": "NotFound", "code": 404, "message": f"{self.path} not found"}
            blob = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "fake",
                        "cluster": {"server": f"http://127.0.0.1:{server.server_port}"},
                    }
                ],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield objects
    server.shutdown()
    server.server_close()


def test_irsa_launcher_config_needs_no_secret(fake_kube: dict[str, dict]) -> None:
    # The irsa overlay's launcher ConfigMap, as applied: credentials from the pod, no Secret.
    fake_kube[LAUNCHER_PATH] = yaml.safe_load(
        (ROOT / "manifests" / "overlays" / "irsa" / "kfp-launcher-from-env.yaml").read_text()
    )
    checks = _by_name(cluster._kube_checks("patchgap", "patchgap-s3", None))
    assert checks["kfp-launcher ConfigMap"].ok is True
    assert "fromEnv" in checks["kfp-launcher ConfigMap"].detail
    assert checks["s3 Secret"].ok is None  # not a failure: nothing reads it


def test_secret_ref_launcher_config_without_its_secret_fails(fake_kube: dict[str, dict]) -> None:
    base = (ROOT / "manifests" / "base" / "kfp-launcher.yaml").read_text()
    fake_kube[LAUNCHER_PATH] = next(yaml.safe_load_all(base))
    checks = _by_name(cluster._kube_checks("patchgap", "patchgap-s3", None))
    assert checks["kfp-launcher ConfigMap"].ok is True
    assert checks["s3 Secret"].ok is False and "patchgap/patchgap-s3" in checks["s3 Secret"].detail


def test_all_green_against_real_s3_and_a_kfp_api(s3_server, s3_bucket, fake_kfp, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    checks = _by_name(cluster.doctor(bucket=s3_bucket, target=cluster.KfpTarget(host=fake_kfp.url)))
    assert checks["s3 credentials"].ok is True
    assert checks["s3 bucket"].ok is True, checks["s3 bucket"].detail
    assert checks["kfp host"].ok is True
    assert fake_kfp.find("GET", "/healthz")
    # No kube context here: the cluster checks are reported as skipped, not as failures.
    assert checks["kubernetes"].ok is None


def test_missing_bucket_and_unreachable_host_fail_with_reasons(s3_server, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    checks = _by_name(
        cluster.doctor(
            bucket="no-such-bucket-patchgap",
            target=cluster.KfpTarget(host="http://127.0.0.1:9"),
        )
    )
    assert (
        checks["s3 bucket"].ok is False and "no-such-bucket-patchgap" in checks["s3 bucket"].detail
    )
    assert checks["kfp host"].ok is False


def test_cli_exits_non_zero_when_a_check_fails(s3_server, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    res = CliRunner().invoke(cli, ["doctor", "--bucket", "no-such-bucket-patchgap"])
    assert res.exit_code == 1
    assert "FAIL" in res.output and "s3 bucket" in res.output
