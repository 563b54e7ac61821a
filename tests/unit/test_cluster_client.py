"""submit / runs / schedule against kfp.Client, with the HTTP layer answered by a loopback recorder:
assert on the requests that would reach the KFP API."""

# No `from __future__ import annotations` here: KFP reads the component annotations at runtime.

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    with pytest.raises(PatchgapError, match="KFP run r-404 not found"):
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


# ------------------------------------------------------------- one line and exit 2, everywhere


def _error_line(res: Any) -> str:
    """The one line a failed command printed; nothing else may reach the terminal."""
    assert res.exit_code == 2, res.output
    assert res.stdout == "", res.stdout
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# Every KFP command but doctor (its failures are rows of its table: tests/integration).
COMMANDS = {
    "submit": ["submit", "{package}", "-p", "text=hi"],
    "runs list": ["runs", "list"],
    "runs get": ["runs", "get", "r-1"],
    "runs wait": ["runs", "wait", "r-1", "--poll", "0"],
    "schedule create": ["schedule", "create", "nightly", "--pipeline", "{package}"]
    + ["--cron", "0 0 2 * * *"],
    "schedule list": ["schedule", "list"],
    "schedule enable": ["schedule", "enable", "rr-1"],
    "schedule disable": ["schedule", "disable", "rr-1"],
    "schedule delete": ["schedule", "delete", "rr-1"],
}


def _bad_host(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """(url, what its one line must say) for each way a host can be wrong."""
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    if kind == "refused":
        return request.getfixturevalue("closed_port"), "connection refused"
    if kind == "unreachable":
        monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 0.2)
        monkeypatch.setattr(cluster, "CONNECT_RETRIES", 0)
        return request.getfixturevalue("blackhole_port"), "unreachable (no connection within 0.2 s"
    if kind == "tls untrusted":
        api = request.getfixturevalue("fake_kfp_tls")
        return api.url, "TLS certificate not trusted (self-signed certificate)"
    api = request.getfixturevalue("fake_kfp")
    if kind == "tls to plain http":
        return api.url.replace("http://", "https://"), "the server does not speak TLS; use http://"
    if kind == "401":
        api.token = "s3cret"
        return api.url, "HTTP 401 Unauthorized; set KFP_TOKEN to a bearer token"
    assert kind == "403"
    api.forbidden = True
    return api.url, "HTTP 403 Forbidden (User is not authorized to access the namespace)"


HOST_FAILURES = ["refused", "unreachable", "tls untrusted", "tls to plain http", "401", "403"]


@pytest.mark.parametrize("kind", HOST_FAILURES)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_host_is_one_line_and_exit_2_for_every_command(
    command: str,
    kind: str,
    package: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, says = _bad_host(kind, request, monkeypatch)
    args = [a.replace("{package}", str(package)) for a in COMMANDS[command]]
    line = _error_line(CliRunner().invoke(cli, [*args, "--host", url]))
    assert line.startswith(f"error: KFP host {url}: "), line
    assert says in line, line


def test_a_private_ca_is_trusted_through_ssl_cert_file(
    fake_kfp_tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_kfp_tls.add_run("r-a", "SUCCEEDED")
    monkeypatch.setenv("SSL_CERT_FILE", str(fake_kfp_tls.certificate))
    res = CliRunner().invoke(cli, ["runs", "get", "r-a", "--host", fake_kfp_tls.url])
    assert res.exit_code == 0, res.output
    assert "SUCCEEDED" in res.stdout


def test_the_token_from_kfp_token_is_sent(fake_kfp, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_kfp.token = "s3cret"
    fake_kfp.add_run("r-a", "SUCCEEDED")
    monkeypatch.setenv("KFP_TOKEN", "s3cret")
    res = CliRunner().invoke(cli, ["runs", "get", "r-a", "--host", fake_kfp.url])
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("KFP_TOKEN", "stale")
    line = _error_line(CliRunner().invoke(cli, ["runs", "get", "r-a", "--host", fake_kfp.url]))
    assert "HTTP 401 Unauthorized; the token (KFP_TOKEN) was not accepted" in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["runs", "get", "r-404"],
            "KFP run r-404 not found on KFP host {url}; see `patchgap runs list`",
        ),
        (["runs", "wait", "r-404"], "KFP run r-404 not found on KFP host {url}"),
        (["schedule", "enable", "rr-404"], "KFP recurring run rr-404 not found on KFP host {url}"),
        (["schedule", "disable", "rr-404"], "KFP recurring run rr-404 not found on KFP host"),
        (
            ["schedule", "delete", "rr-404"],
            "not found on KFP host {url}; see `patchgap schedule list`",
        ),
        (["runs", "list", "-e", "nightly"], "KFP experiment 'nightly' not found on {url}"),
        (["schedule", "list", "-e", "nightly"], "KFP experiment 'nightly' not found on {url}"),
        (
            ["runs", "get", "r-404", "-n", "team-a"],
            "not found on KFP host {url} in namespace team-a",
        ),
    ],
)
def test_an_unknown_run_schedule_or_experiment_is_one_line(
    fake_kfp, args: list[str], says: str
) -> None:
    line = _error_line(CliRunner().invoke(cli, [*args, "--host", fake_kfp.url]))
    assert says.format(url=fake_kfp.url) in line, line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["submit", "fulll"],
            "pipeline 'fulll': not a file and not one of full, rewrite, watch, study; did you mean "
            "'full'?",
        ),
        (["submit", "no/such.yaml"], "pipeline 'no/such.yaml': not a file"),
        (["schedule", "create", "x", "--pipeline", "wacth"], "did you mean 'watch'?"),
        (["submit", "{config}"], "demo.yaml: not a compiled KFP pipeline"),
    ],
)
def test_an_unknown_pipeline_is_one_line_before_any_request(
    fake_kfp, args: list[str], says: str
) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    args = [a.replace("{config}", str(config)) for a in args]
    line = _error_line(CliRunner().invoke(cli, [*args, "--host", fake_kfp.url]))
    assert says in line, line
    assert fake_kfp.requests == []


def test_submit_reads_each_parameter_as_its_declared_type(fake_kfp) -> None:
    params = {
        "dataset_uri": "s3://patchgap/datasets/d.jsonl",
        "num_shards": "4",
        "min_acceptance_rate": "0.25",
        "prompt_only_baseline": "True",
        "node_selector": '{"pool": "a100"}',
        "tolerations": "[]",
        "gate_config": '{"distinct_n": 2}',  # a STRING parameter holding JSON stays text
        "dataset_fields": "123",  # and one that looks like a number too
    }
    args = [a for k, v in params.items() for a in ("-p", f"{k}={v}")]
    res = CliRunner().invoke(cli, ["submit", "full", "--host", fake_kfp.url, *args])
    assert res.exit_code == 0, res.output
    (run,) = fake_kfp.find("POST", "/apis/v2beta1/runs")
    assert run.body["runtime_config"]["parameters"] == {
        "dataset_uri": "s3://patchgap/datasets/d.jsonl",
        "num_shards": 4,
        "min_acceptance_rate": 0.25,
        "prompt_only_baseline": True,
        "node_selector": {"pool": "a100"},
        "tolerations": [],
        "gate_config": '{"distinct_n": 2}',
        "dataset_fields": "123",
    }


@pytest.mark.parametrize(
    ("param", "says"),
    [
        (
            "num_shard=4",
            "-p num_shard: pipeline full.yaml has no parameter 'num_shard'; did you "
            "mean 'num_shards'?",
        ),
        ("num_shards=four", "-p num_shards=four: pipeline full.yaml expects an integer"),
        ("num_shards=2.5", "-p num_shards=2.5: pipeline full.yaml expects an integer"),
        ("min_acceptance_rate=high", "expects a number (NUMBER_DOUBLE)"),
        ("min_acceptance_rate=nan", "expects a number (NUMBER_DOUBLE)"),
        ("prompt_only_baseline=maybe", "expects true or false (BOOLEAN)"),
        ("node_selector=[1, 2]", "expects a mapping"),
        ("tolerations={effect: NoSchedule}", "expects a list"),
        ("tolerations=[unclosed", "expects a list"),
        ("nothing", "-p 'nothing': expected KEY=VALUE"),
    ],
)
def test_a_bad_parameter_is_one_line_before_any_request(fake_kfp, param: str, says: str) -> None:
    args = ["-p", "dataset_uri=s3://b/d.jsonl", "-p", param, "--host", fake_kfp.url]
    schedule = ["schedule", "create", "x", "--pipeline", "full", "--interval", "3600"]
    for command in (["submit", "full"], schedule):
        assert says in _error_line(CliRunner().invoke(cli, [*command, *args]))
    assert fake_kfp.requests == []


def test_a_missing_required_parameter_is_one_line_before_any_request(fake_kfp) -> None:
    line = _error_line(CliRunner().invoke(cli, ["submit", "rewrite", "--host", fake_kfp.url]))
    assert (
        "pipeline rewrite.yaml: required parameters adapter_uri, dataset_uri not given; pass "
        "-p adapter_uri=... -p dataset_uri=..." in line
    )
    with pytest.raises(ConfigError, match="required parameter dataset_uri not given"):
        cluster.submit(cluster.KfpTarget(host=fake_kfp.url), str(pipeline_package("full")))
    assert fake_kfp.requests == []


# The console script as installed; the timeouts can be shortened for the unreachable host.
_ENTRY = (
    "import sys; import patchgap.kfp.client as c; from patchgap.cli.main import app; "
    "c.CONNECT_TIMEOUT_S, c.CONNECT_RETRIES = float(sys.argv.pop(1)), 0; sys.argv[0] = "
    "'patchgap'; app()"
)


def _patchgap(args: list[str], connect_timeout: float = 10.0) -> subprocess.CompletedProcess:
    unset = ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT", "SSL_CERT_FILE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run(
        [sys.executable, "-c", _ENTRY, str(connect_timeout), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_the_installed_command_prints_only_the_line(
    closed_port: str, blackhole_port: str, fake_kfp, fake_kfp_tls
) -> None:
    """In a process of its own, with no test harness holding the loggers: kfp.Client's prints,
    warnings and urllib3's logged retries must not reach the terminal either."""
    fake_kfp.token = "s3cret"
    cases = [
        (["runs", "list", "--host", closed_port], closed_port, 10.0),
        (["submit", "full", "-p", "dataset_uri=s3://b/d", "--host", closed_port], closed_port, 10),
        (["schedule", "list", "--host", fake_kfp.url], fake_kfp.url, 10.0),
        (["runs", "get", "r-1", "--host", fake_kfp_tls.url], fake_kfp_tls.url, 10.0),
        (["runs", "wait", "r-1", "--host", blackhole_port], blackhole_port, 0.3),
    ]
    for args, url, connect_timeout in cases:
        res = _patchgap(args, connect_timeout)
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stdout == ""
        (line,) = res.stderr.splitlines()
        assert line.startswith(f"error: KFP host {url}: "), line


def test_wait_does_not_retry_a_host_it_never_reached(
    closed_port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(cluster.time, "sleep", slept.append)
    # With a namespace kfp.Client skips its health check: the first poll is the first contact.
    target = cluster.KfpTarget(host=closed_port, namespace="team-a")
    with pytest.raises(PatchgapError, match=f"KFP host {closed_port}: connection refused"):
        cluster.wait_run(target, "r-1", poll_seconds=30)
    assert slept == []
