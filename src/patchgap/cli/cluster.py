"""``patchgap submit``, ``patchgap runs ...``, ``patchgap schedule ...`` and ``patchgap doctor``:
the KFP client side. A failure (bad parameter, unknown pipeline or run, unreachable host, refused
token) is one line on stderr and exit code 2."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import typer
from rich.markup import escape
from rich.table import Table

from patchgap.cli import print_error
from patchgap.cli.output import OUTPUT_FORMAT, Format, Output
from patchgap.errors import user_message
from patchgap.kfp import client as ops
from patchgap.pipelines.compile import pipeline_package

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(command: F) -> F:
    """Print a user error as one line and exit 2, here rather than only in the entry point, so
    that the command behaves the same under any runner."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the one mapping decides; defects re-raise
            message = user_message(err)
            if message is None:
                raise
            print_error(message)
            raise typer.Exit(2) from None

    return cast(F, run)


schedule_app = typer.Typer(
    help="Recurring runs (e.g. the watch pipeline over new datasets).", no_args_is_help=True
)

HOST = typer.Option(None, "--host", help="KFP API endpoint (or KF_PIPELINES_ENDPOINT)")
NAMESPACE = typer.Option(None, "--namespace", "-n", help="Kubeflow profile namespace")
PARAM = typer.Option([], "--param", "-p", help="pipeline parameter KEY=VALUE (repeat)")
TIMEOUT = typer.Option(None, "--timeout", min=0, help="seconds to wait (default: no limit)")
POLL = typer.Option(10.0, "--poll", min=0, help="seconds between state checks")

runs_app = typer.Typer(
    help="State of pipeline runs on KFP (their outputs: `patchgap artifacts`).",
    no_args_is_help=True,
)
_STATE_STYLE = {"SUCCEEDED": "green", "SKIPPED": "green", "FAILED": "red", "CANCELED": "red"}


def _runs_table(runs: list[ops.RunStatus]) -> Table:
    table = Table("run id", "name", "state", "created", "finished", "error")
    for r in runs:
        style = _STATE_STYLE.get(r.state, "yellow")
        table.add_row(
            r.run_id,
            escape(r.name or "-"),
            f"[{style}]{r.state}[/{style}]",
            r.created_at or "-",
            r.finished_at or "-",
            escape(r.error or ""),  # the server's text, not rich markup
        )
    return table


def _wait(
    out: Output, target: ops.KfpTarget, run_id: str, timeout: float | None, poll: float
) -> None:
    """Follow a run to its end (state changes on stderr); exit 1 unless it succeeded."""
    status = ops.wait_run(
        target,
        run_id,
        timeout=timeout,
        poll_seconds=poll,
        on_change=lambda s: out.err.print(f"{s.run_id}: {s.state}", highlight=False),
    )
    out.result(dataclasses.asdict(status), _runs_table([status]), f"ui: {status.url}")
    if not status.ok:
        raise typer.Exit(1)


@_one_line_errors
def submit(
    pipeline: str = typer.Argument(
        "full", help="full | rewrite | watch | study | a compiled YAML path"
    ),
    host: str | None = HOST,
    namespace: str | None = NAMESPACE,
    experiment: str = typer.Option("patchgap", "--experiment", "-e"),
    run_name: str | None = typer.Option(None, "--run-name"),
    params: list[str] = PARAM,
    service_account: str | None = typer.Option(None, "--service-account"),
    pipeline_root: str | None = typer.Option(None, "--pipeline-root", help="s3://bucket/prefix"),
    caching: bool | None = typer.Option(None, "--caching/--no-caching"),
    wait: bool = typer.Option(
        False, "--wait", help="follow the run to its end; exit 1 unless it succeeds"
    ),
    timeout: float | None = TIMEOUT,
    poll: float = POLL,
    output_format: Format = OUTPUT_FORMAT,
    config: str | None = typer.Option(
        None,
        "--config",
        "-c",
        help="run YAML: checked, its local inputs put in S3; gives the pipeline and arguments",
    ),
) -> None:
    """Submit one run of a compiled pipeline to KFP; prints the run id and its UI link. The -p
    parameters are checked against the pipeline's declared inputs before the host is contacted."""
    out = Output(output_format)
    target = ops.KfpTarget(host=host, namespace=namespace)
    arguments: dict = {}
    if config is not None:  # --param still overrides what the run YAML gives
        from pathlib import Path

        # Deferred: kept out of the CLI's start-up.
        from patchgap.run.submission import submission_arguments

        pipeline, arguments = submission_arguments(Path(config), say=out.say)
    package = pipeline_package(pipeline)
    res = ops.submit(
        target,
        package,
        params=ops.typed_params(package, ops.parse_params(params), base=arguments),
        experiment=experiment,
        run_name=run_name,
        service_account=service_account,
        pipeline_root=pipeline_root,
        enable_caching=caching,
    )
    if wait:
        out.say(f"submitted {res.run_id}: {res.url}")
        _wait(out, target, res.run_id, timeout, poll)
        return
    out.result(
        {"run_id": res.run_id, "url": res.url}, f"run id: {res.run_id}", f"ui:     {res.url}"
    )


@runs_app.command("list")
@_one_line_errors
def runs_list(
    host: str | None = HOST,
    namespace: str | None = NAMESPACE,
    experiment: str | None = typer.Option(None, "--experiment", "-e"),
    limit: int = typer.Option(20, "--limit", min=1, help="newest N runs"),
    output_format: Format = OUTPUT_FORMAT,
) -> None:
    """List the newest runs with their states."""
    runs = ops.list_runs(ops.KfpTarget(host=host, namespace=namespace), experiment, limit)
    Output(output_format).result([dataclasses.asdict(r) for r in runs], _runs_table(runs))


@runs_app.command("get")
@_one_line_errors
def runs_get(
    run_id: str = typer.Argument(...),
    host: str | None = HOST,
    namespace: str | None = NAMESPACE,
    output_format: Format = OUTPUT_FORMAT,
) -> None:
    """Show one run's state (and its error when it failed)."""
    target = ops.KfpTarget(host=host, namespace=namespace)
    status = ops.get_run(target, run_id)
    Output(output_format).result(
        dataclasses.asdict(status), _runs_table([status]), f"ui: {status.url}"
    )


@runs_app.command("wait")
@_one_line_errors
def runs_wait(
    run_id: str = typer.Argument(...),
    host: str | None = HOST,
    namespace: str | None = NAMESPACE,
    timeout: float | None = TIMEOUT,
    poll: float = POLL,
    output_format: Format = OUTPUT_FORMAT,
) -> None:
    """Wait until a run ends; exit 0 when it succeeded, 1 when it failed or was canceled."""
    target = ops.KfpTarget(host=host, namespace=namespace)
    _wait(Output(output_format), target, run_id, timeout, poll)


@schedule_app.command("create")
@_one_line_errors
def schedule_create(
    name: str = typer.Argument(..., help="recurring run name"),
    pipeline: str = typer.Option(
        "watch", "--pipeline", help="full | rewrite | watch | study | YAML path"
    ),
    cron: str | None = typer.Option(
        None, "--cron", help="KFP 6-field cron, seconds first: '0 0 * * * *' = hourly"
    ),
    interval: int | None = typer.Option(None, "--interval", help="seconds between runs (>= 60)"),
    max_concurrency: int = typer.Option(1, "--max-concurrency"),
    params: list[str] = PARAM,
    host: str | None = HOST,
    namespace: str | None = NAMESPACE,
    experiment: str = typer.Option("patchgap", "--experiment", "-e"),
    service_account: str | None = typer.Option(None, "--service-account"),
    pipeline_root: str | None = typer.Option(None, "--pipeline-root"),
    disabled: bool = typer.Option(False, "--disabled", help="create it paused"),
) -> None:
    """Create a recurring run (no catch-up: a missed window never triggers a burst)."""
    package = pipeline_package(pipeline)
    rid = ops.create_schedule(
        ops.KfpTarget(host=host, namespace=namespace),
        ops.Schedule(
            name=name,
            pipeline=str(package),
            cron=cron,
            interval_seconds=interval,
            max_concurrency=max_concurrency,
            params=ops.typed_params(package, ops.parse_params(params)),
            experiment=experiment,
            service_account=service_account,
            pipeline_root=pipeline_root,
            enabled=not disabled,
        ),
    )
    typer.echo(f"recurring run id: {rid}")


@schedule_app.command("list")
@_one_line_errors
def schedule_list(
    host: str | None = HOST,
    namespace: str | None = NAMESPACE,
    experiment: str | None = typer.Option(None, "--experiment", "-e"),
    output_format: Format = OUTPUT_FORMAT,
) -> None:
    """List recurring runs."""
    rows = ops.list_schedules(ops.KfpTarget(host=host, namespace=namespace), experiment)
    table = Table("id", "name", "status", "trigger", "max conc.", "no catch-up")
    for r in rows:
        trig = r["cron"] or (f"every {r['interval_seconds']}s" if r["interval_seconds"] else "-")
        table.add_row(
            r["id"],
            r["name"],
            str(r["status"]),
            trig,
            str(r["max_concurrency"]),
            str(r["no_catchup"]),
        )
    Output(output_format).result(rows, table)


def _state_command(action: str):  # noqa: ANN202 - typer reads the signature of the inner function
    @_one_line_errors
    def command(
        recurring_run_id: str = typer.Argument(...),
        host: str | None = HOST,
        namespace: str | None = NAMESPACE,
    ) -> None:
        ops.set_schedule_state(
            ops.KfpTarget(host=host, namespace=namespace), recurring_run_id, action
        )
        typer.echo(
            f"{action}d {recurring_run_id}" if action != "delete" else f"deleted {recurring_run_id}"
        )

    command.__doc__ = f"{action.capitalize()} a recurring run."
    return command


for _action in ops.SCHEDULE_ACTIONS:
    schedule_app.command(_action)(_state_command(_action))


@_one_line_errors
def doctor(
    bucket: str = typer.Option("patchgap", "--bucket", envvar="PATCHGAP_BUCKET"),
    host: str | None = HOST,
    namespace: str = typer.Option("patchgap", "--namespace", "-n"),
    secret: str = typer.Option("patchgap-s3", "--secret", help="S3 credentials Secret name"),
    kube_context: str | None = typer.Option(None, "--context", help="kube context"),
    output_format: Format = OUTPUT_FORMAT,
) -> None:
    """Check what a submit needs (S3, bucket, KFP host, launcher ConfigMap and Secret)."""
    checks = ops.doctor(
        bucket=bucket,
        target=ops.KfpTarget(host=host, namespace=namespace),
        namespace=namespace,
        secret_name=secret,
        kube_context=kube_context,
    )
    table = Table("check", "result", "detail")
    mark = {True: "[green]ok[/green]", False: "[red]FAIL[/red]", None: "[yellow]skip[/yellow]"}
    for c in checks:
        table.add_row(c.name, mark[c.ok], c.detail)
    Output(output_format).result([dataclasses.asdict(c) for c in checks], table)
    # A failed check is a setting to fix (host, token, bucket, Secret): the exit code of every
    # other user mistake, each named on its own row.
    if any(c.ok is False for c in checks):
        raise typer.Exit(2)
