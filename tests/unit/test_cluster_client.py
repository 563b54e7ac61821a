"""submit / runs / schedule against kfp.Client, with the HTTP layer answered by a loopback recorder:
assert on the requests that would reach the KFP API."""

# No `from __future__ import annotations` here: KFP reads the component annotations at runtime.

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchgap.cli.main import cli
from patchgap.errors import ConfigError, PatchgapError
from patchgap.kfp import client as cluster
from patchgap.pipelines.compile import pipeline_package


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def echo(text: str) -> str:
        return text

    @dsl.pipeline(name="probe")
    def probe(text: str = "a", shards: int = 1) -> None:
        echo(text=text)

    out = tmp_path_factory.mktemp("pkg") / "probe.yaml"
    compiler.Compiler().compile(probe, str(out))
    return out


def test_submit_sends_run_with_params_root_and_service_account(fake_kfp, package: Path) -> None:
    target = cluster.KfpTarget(host=fake_kfp.url, namespace="team-a")
    res = cluster.submit(
        target,
        str(package),
        params={"text": "hello", "shards": 4},
        experiment="nightly",
        run_name="r1",
        service_account="patchgap-runner",
        pipeline_root="s3://bucket/root",
    )
    assert res.run_id == "run-0001"
    assert res.url == f"{fake_kfp.url}/#/runs/details/run-0001"
    (exp,) = fake_kfp.find("POST", "/experiments")
    assert exp.body == {"display_name": "nightly", "namespace": "team-a"}
    (run,) = fake_kfp.find("POST", "/apis/v2beta1/runs")
    assert run.body["display_name"] == "r1"
    assert run.body["service_account"] == "patchgap-runner"
    assert run.body["runtime_config"] == {
        "parameters": {"text": "hello", "shards": 4},
        "pipeline_root": "s3://bucket/root",
    }
    assert run.body["pipeline_spec"]["pipelineInfo"]["name"] == "probe"


def test_schedule_cron_no_catchup_and_lifecycle(fake_kfp, package: Path) -> None:
    target = cluster.KfpTarget(host=fake_kfp.url)
    rid = cluster.create_schedule(
        target,
        cluster.Schedule(
            name="watch-new",
            pipeline=str(package),
            cron="0 */15 * * * *",
            max_concurrency=2,
            params={"text": "x"},
        ),
    )
    (req,) = fake_kfp.find("POST", "/recurringruns")
    assert req.body["trigger"] == {"cron_schedule": {"cron": "0 */15 * * * *"}}
    assert req.body["no_catchup"] is True
    assert req.body["max_concurrency"] == 2
    assert req.body["mode"] == "ENABLE"
    rows = cluster.list_schedules(target)
    assert [r["id"] for r in rows] == [rid] and rows[0]["cron"] == "0 */15 * * * *"
    cluster.set_schedule_state(target, rid, "disable")
    assert fake_kfp.recurring[rid]["status"] == "DISABLED"
    cluster.set_schedule_state(target, rid, "enable")
    assert fake_kfp.recurring[rid]["status"] == "ENABLED"
    cluster.set_schedule_state(target, rid, "delete")
    assert rid not in fake_kfp.recurring
    assert fake_kfp.find("DELETE", f"/recurringruns/{rid}")


def test_schedule_interval(fake_kfp, package: Path) -> None:
    target = cluster.KfpTarget(host=fake_kfp.url)
    cluster.create_schedule(
        target, cluster.Schedule(name="hourly", pipeline=str(package), interval_seconds=3600)
    )
    (req,) = fake_kfp.find("POST", "/recurringruns")
    assert req.body["trigger"] == {"periodic_schedule": {"interval_second": "3600"}} or req.body[
        "trigger"
    ] == {"periodic_schedule": {"interval_second": 3600}}


@pytest.mark.parametrize(
    ("cron", "interval", "match"),
    [
        ("0 2 * * *", None, "6 fields"),
        (None, None, "exactly one"),
        ("0 0 2 * * *", 3600, "exactly one"),
        (None, 5, "at least 60"),
    ],
)
def test_schedule_rejects_bad_triggers_before_any_request(
    fake_kfp, package: Path, cron: str | None, interval: int | None, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        cluster.create_schedule(
            cluster.KfpTarget(host=fake_kfp.url),
            cluster.Schedule(name="x", pipeline=str(package), cron=cron, interval_seconds=interval),
        )
    assert fake_kfp.requests == []


def test_unknown_recurring_run_is_one_clear_line(fake_kfp) -> None:
    res = CliRunner().invoke(cli, ["schedule", "delete", "rr-404", "--host", fake_kfp.url])
    assert res.exit_code != 0
    assert "rr-404" in str(res.exception) and "404" in str(res.exception)


def test_cli_submit_prints_run_id_and_link(fake_kfp, package: Path) -> None:
    res = CliRunner().invoke(
        cli, ["submit", str(package), "--host", fake_kfp.url, "-p", "text=hi", "-p", "shards=2"]
    )
    assert res.exit_code == 0, res.output
    assert "run-0001" in res.output and "#/runs/details/run-0001" in res.output
    (run,) = fake_kfp.find("POST", "/apis/v2beta1/runs")
    assert run.body["runtime_config"]["parameters"] == {"text": "hi", "shards": 2}


def test_missing_host_is_config_error(monkeypatch: pytest.MonkeyPatch, package: Path) -> None:
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    with pytest.raises(ConfigError, match="KFP host"):
        cluster.submit(cluster.KfpTarget(), str(package))


def test_unknown_pipeline_name_is_config_error() -> None:
    with pytest.raises(ConfigError, match="not a file"):
        pipeline_package("no-such-pipeline")


def test_submit_wait_follows_the_run_and_exits_1_when_it_fails(fake_kfp, package: Path) -> None:
    fake_kfp.add_run("run-0001", "PENDING", "RUNNING", "FAILED", error="sft: OOMKilled")
    res = CliRunner().invoke(
        cli, ["submit", str(package), "--host", fake_kfp.url, "--wait", "--poll", "0", "-o", "json"]
    )
    assert res.exit_code == 1, res.output
    status = json.loads(res.stdout)
    assert status["run_id"] == "run-0001" and status["state"] == "FAILED"
    assert status["error"] == "sft: OOMKilled"
    # Each new state is reported once, on stderr.
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("run-0001:")] == [
        "run-0001: PENDING",
        "run-0001: RUNNING",
        "run-0001: FAILED",
    ]


@pytest.mark.parametrize(("final", "code"), [("SUCCEEDED", 0), ("CANCELED", 1), ("SKIPPED", 0)])
def test_runs_wait_exit_code_follows_the_final_state(fake_kfp, final: str, code: int) -> None:
    fake_kfp.add_run("r-1", "RUNNING", "RUNNING", final)
    res = CliRunner().invoke(cli, ["runs", "wait", "r-1", "--host", fake_kfp.url, "--poll", "0"])
    assert res.exit_code == code, res.output
    assert final in res.stdout
    assert len(fake_kfp.find("GET", "/apis/v2beta1/runs/r-1")) == 3


def test_wait_outlives_a_few_server_errors_but_not_a_missing_run(fake_kfp) -> None:
    target = cluster.KfpTarget(host=fake_kfp.url)
    fake_kfp.add_run("r-1", "RUNNING", "HTTP 503", "HTTP 502", "SUCCEEDED")
    assert cluster.wait_run(target, "r-1", poll_seconds=0).state == "SUCCEEDED"
    fake_kfp.add_run("r-2", "RUNNING", *["HTTP 503"] * (cluster.WAIT_RETRIES + 1), "SUCCEEDED")
    with pytest.raises(PatchgapError, match="r-2: HTTP 503"):
        cluster.wait_run(target, "r-2", poll_seconds=0)
    with pytest.raises(PatchgapError, match="r-404: HTTP 404"):
        cluster.wait_run(target, "r-404", poll_seconds=0)
    assert len(fake_kfp.find("GET", "/runs/r-404")) == 1  # a 4xx is not retried


def test_wait_timeout_is_one_clear_error(fake_kfp) -> None:
    fake_kfp.add_run("r-slow", "RUNNING")
    with pytest.raises(PatchgapError, match="r-slow: still RUNNING after"):
        cluster.wait_run(cluster.KfpTarget(host=fake_kfp.url), "r-slow", timeout=0, poll_seconds=0)


def test_runs_list_and_get(fake_kfp) -> None:
    fake_kfp.add_run("r-a", "SUCCEEDED", display_name="nightly-1")
    fake_kfp.add_run("r-b", "FAILED", display_name="nightly-2", error="gate: acceptance 0.1")
    res = CliRunner().invoke(cli, ["runs", "list", "--host", fake_kfp.url, "-o", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["run_id"]: r for r in json.loads(res.stdout)}
    assert rows["r-a"]["name"] == "nightly-1" and rows["r-b"]["state"] == "FAILED"
    assert rows["r-a"]["created_at"].startswith("2026-01-01")
    (req,) = fake_kfp.find("GET", "/apis/v2beta1/runs")
    assert req.query["sort_by"] == ["created_at desc"]

    table = CliRunner().invoke(cli, ["runs", "get", "r-b", "--host", fake_kfp.url])
    assert table.exit_code == 0, table.output
    assert "FAILED" in table.stdout and "gate: acceptance 0.1" in table.stdout
    missing = CliRunner().invoke(cli, ["runs", "get", "r-404", "--host", fake_kfp.url])
    assert isinstance(missing.exception, PatchgapError)
    assert "r-404" in str(missing.exception) and "404" in str(missing.exception)
