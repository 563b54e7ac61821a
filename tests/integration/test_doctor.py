"""``patchgap doctor`` checks S3, the bucket and the KFP host before any GPU time is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def test_cli_exits_2_when_a_check_fails(s3_server, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    res = CliRunner().invoke(cli, ["doctor", "--bucket", "no-such-bucket-patchgap"])
    assert res.exit_code == 2
    assert "FAIL" in res.output and "s3 bucket" in res.output


def _no_credentials_anywhere(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """No keys in the environment, no profile files, no embedded server, no instance role."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    monkeypatch.setenv("PATCHGAP_HOME", str(home))
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")


def _s3_rows(checks: list[cluster.Check]) -> tuple[cluster.Check, cluster.Check]:
    rows = _by_name(checks)
    return rows["s3 credentials"], rows["s3 bucket"]


def test_no_credentials_fail_one_row_and_the_bucket_is_not_checked(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_credentials_anywhere(monkeypatch, tmp_path)
    creds, bucket = _s3_rows(cluster.doctor(bucket="patchgap"))
    assert creds.ok is False and creds.detail.startswith("no S3 credentials: set AWS_ACCESS_KEY_ID")
    # Not a second verdict on the same question: skipped, saying why.
    assert bucket.ok is None and bucket.detail == "s3://patchgap/ not checked: no S3 credentials"


def test_half_a_key_pair_is_named(s3_server, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_credentials_anywhere(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key_id)
    creds, bucket = _s3_rows(cluster.doctor(bucket="patchgap"))
    assert creds.ok is False
    assert creds.detail == (
        "AWS_ACCESS_KEY_ID is set (environment) but AWS_SECRET_ACCESS_KEY is not"
    )
    assert bucket.ok is None


def test_credentials_the_endpoint_refuses_fail_their_own_row(
    s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    creds, bucket = _s3_rows(cluster.doctor(bucket=s3_bucket))
    assert creds.ok is False, creds.detail
    assert f"access key {s3_server.access_key_id[:4]}... from environment" in creds.detail
    assert f"refused by {s3_server.endpoint}" in creds.detail
    assert "SignatureDoesNotMatch" in creds.detail
    assert bucket.ok is None and "credentials refused" in bucket.detail


def _patchgap(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """The installed command in a process of its own (fresh boto3 session, bare loggers)."""
    return subprocess.run(
        [sys.executable, "-c", "from patchgap.cli.main import app; app()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_credentials_from_a_profile_file_are_the_ones_the_bucket_check_uses(
    s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    shared = tmp_path / "credentials"
    shared.write_text(
        f"[default]\naws_access_key_id = {s3_server.access_key_id}\n"
        f"aws_secret_access_key = {s3_server.secret_access_key}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KF_", "KFP_"))}
    env |= {
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint,
        "AWS_REGION": s3_server.region,
        "AWS_SHARED_CREDENTIALS_FILE": str(shared),
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "PATCHGAP_HOME": str(tmp_path / "home"),
        "KUBECONFIG": "/nonexistent/kubeconfig",
    }
    res = _patchgap(["doctor", "--bucket", s3_bucket, "-o", "json"], env)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["s3 credentials"]["ok"] is True
    assert "shared-credentials-file" in rows["s3 credentials"]["detail"]
    assert rows["s3 bucket"]["ok"] is True, rows["s3 bucket"]["detail"]
    assert res.returncode == 0 and res.stderr == ""

    shared.unlink()  # and without it, one verdict: no credentials
    res = _patchgap(["doctor", "--bucket", s3_bucket, "-o", "json"], env)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["s3 credentials"]["ok"] is False and rows["s3 bucket"]["ok"] is None
    assert res.returncode == 2 and res.stderr == ""


@pytest.mark.parametrize("kind", ["refused", "401", "403", "tls untrusted", "tls to plain http"])
def test_a_bad_kfp_host_is_one_line_in_its_row(
    kind: str, s3_server, s3_bucket: str, request, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    if kind == "refused":
        url, says = request.getfixturevalue("closed_port"), "connection refused"
    elif kind == "tls untrusted":
        url = request.getfixturevalue("fake_kfp_tls").url
        says = "TLS certificate not trusted"
    else:
        api = request.getfixturevalue("fake_kfp")
        api.token = "s3cret" if kind == "401" else None
        api.forbidden = kind == "403"
        url = api.url.replace("http://", "https://") if kind.startswith("tls") else api.url
        says = {"401": "HTTP 401", "403": "HTTP 403", "tls to plain http": "does not speak TLS"}[
            kind
        ]
    host = _by_name(cluster.doctor(bucket=s3_bucket, target=cluster.KfpTarget(host=url)))[
        "kfp host"
    ]
    assert host.ok is False
    assert host.detail.startswith(f"KFP host {url}: ") and says in host.detail, host.detail
    assert "\n" not in host.detail


def test_doctor_against_a_refusing_host_prints_its_table_alone(
    s3_server, s3_bucket: str, fake_kfp
) -> None:
    # kfp.Client itself would retry a 401 health check five times, 5 s apart, logging a traceback
    # each time.
    fake_kfp.token = "s3cret"
    env = {k: v for k, v in os.environ.items() if k not in ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT")}
    env["KUBECONFIG"] = "/nonexistent/kubeconfig"
    res = _patchgap(["doctor", "--bucket", s3_bucket, "--host", fake_kfp.url, "-o", "json"], env)
    assert res.returncode == 2 and res.stderr == "", res.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["s3 bucket"]["ok"] is True
    assert rows["kfp host"]["ok"] is False
    assert "HTTP 401 Unauthorized; set KFP_TOKEN" in rows["kfp host"]["detail"]
    assert len(fake_kfp.find("GET", "/healthz")) == 1


def _secret(name: str, *keys: str) -> dict:
    data = {k: "eA==" for k in keys}  # base64 of "x"
    return {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": name}, "data": data}


SECRETS_PATH = "/api/v1/namespaces/patchgap/secrets/"


def test_the_secret_the_launcher_names_is_the_one_checked(fake_kube: dict[str, dict]) -> None:
    base = next(yaml.safe_load_all((ROOT / "manifests/base/kfp-launcher.yaml").read_text()))
    fake_kube[LAUNCHER_PATH] = base
    fake_kube[SECRETS_PATH + "patchgap-s3"] = _secret(
        "patchgap-s3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
    )
    checks = _by_name(cluster._kube_checks("patchgap", "patchgap-s3", None))
    launcher = checks["kfp-launcher ConfigMap"]
    assert launcher.ok is True
    assert launcher.detail == "s3 provider reads credentials from Secret patchgap/patchgap-s3"
    assert checks["s3 Secret"].ok is True and "kfp-launcher s3 Secret" not in checks

    # A launcher reading another Secret, with other key names: that one is checked too.
    providers = base["data"]["providers"].replace("secretName: patchgap-s3", "secretName: kfp-s3")
    providers = providers.replace("accessKeyKey: AWS_ACCESS_KEY_ID", "accessKeyKey: accesskey")
    fake_kube[LAUNCHER_PATH] = {**base, "data": {**base["data"], "providers": providers}}
    fake_kube[SECRETS_PATH + "kfp-s3"] = _secret("kfp-s3", "AWS_SECRET_ACCESS_KEY")
    checks = _by_name(cluster._kube_checks("patchgap", "patchgap-s3", None))
    assert checks["kfp-launcher ConfigMap"].detail.endswith("from Secret patchgap/kfp-s3")
    assert checks["s3 Secret"].ok is True
    assert checks["kfp-launcher s3 Secret"].ok is False
    assert checks["kfp-launcher s3 Secret"].detail == "patchgap/kfp-s3 lacks accesskey"
