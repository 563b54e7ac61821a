"""``patchgap doctor`` checks S3, the bucket and the KFP host before any GPU time is spent."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from patchgap.cli.main import cli
from patchgap.kfp import client as cluster

pytestmark = pytest.mark.integration


def _by_name(checks: list[cluster.Check]) -> dict[str, cluster.Check]:
    return {c.name: c for c in checks}


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
