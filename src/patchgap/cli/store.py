"""``patchgap store up|down|status|env``: the embedded S3 server (SeaweedFS) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import shlex
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from patchgap.errors import StoreError

app = typer.Typer(
    help="Run the embedded S3 server (SeaweedFS `weed mini` on 127.0.0.1).",
    no_args_is_help=True,
)
console = Console()

_HOME = typer.Option(
    None, "--home", help="State folder (data, credentials, PID). Default: $PATCHGAP_HOME."
)
_PORT = typer.Option(
    None,
    "--port",
    help="S3 port; the server also takes the next 8 ports. Default: last used, else 8333.",
)


def _server(home: Path | None, port: int | None = None, bucket: str | None = None):  # noqa: ANN202
    # Deferred: kept out of the CLI's start-up.
    from patchgap.storage.server import EmbeddedS3

    return EmbeddedS3(home, port, bucket=bucket)


@app.command()
def up(
    home: Path | None = _HOME,
    port: int | None = _PORT,
    bucket: str = typer.Option("patchgap", "--bucket", help="Bucket to create once ready."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for S3 to answer."),
) -> None:
    """Start the server (if not running), wait until S3 answers, create the bucket.

    Two at once: one starts the server; the other waits for it, then says in one line that it
    is running (exit 0), or names the lock's holder if that takes longer than --timeout + 30 s
    (exit 2)."""
    server = _server(home, port, bucket)
    server.ready_timeout = timeout
    with server.locked(wait=timeout + 30.0):
        before = server.status(probe=False)
        started = time.monotonic()
        status = server.start(wait=True)
    took = time.monotonic() - started
    if server.waited_for is not None and before.running:
        typer.echo(
            f"SeaweedFS already running: started meanwhile by another `patchgap store up` "
            f"(pid {server.waited_for}); pid {status.pid}, S3 at {status.endpoint}"
        )
        return
    if before.stale_pid is not None:
        typer.echo(f"removed a stale PID file (pid {before.stale_pid} was not running)")
    verb = "already running" if before.running else f"started in {took:.1f}s"
    typer.echo(f"SeaweedFS {verb}: pid {status.pid}, S3 at {status.endpoint}")
    typer.echo(f"bucket:      s3://{bucket}/")
    typer.echo(f"credentials: {status.env_file} (mode 0600)")
    typer.echo(f"data:        {status.data_dir}")
    typer.echo(f"log:         {status.log_file}")
    typer.echo('use it:      eval "$(patchgap store env)"')


@app.command()
def down(
    home: Path | None = _HOME,
    timeout: float = typer.Option(15.0, "--timeout", help="Seconds to wait before SIGKILL."),
) -> None:
    """Stop the server: SIGTERM, wait, then SIGKILL. Data stays on disk."""
    server = _server(home)
    with server.locked(wait=server.ready_timeout + 30.0 + timeout):
        before = server.status(probe=False)
        stopped = server.stop(timeout=timeout)
    if stopped:
        typer.echo(f"stopped SeaweedFS (pid {before.pid})")
    elif before.stale_pid is not None:
        typer.echo(f"not running; removed a stale PID file (pid {before.stale_pid})")
    else:
        typer.echo("not running")


@app.command()
def status(home: Path | None = _HOME) -> None:
    """Show whether the server runs and answers; exit code 1 when it does not run (2 when a
    `store up` or `store down` keeps its lock for more than 5 s)."""
    server = _server(home)
    # Under the lock, so a start or stop in progress is not reported half done.
    busy = server.locked(wait=5.0) if server.server_dir.is_dir() else contextlib.nullcontext()
    with busy:
        st = server.status()
    table = Table(show_header=False, box=None)
    state = "[green]ready[/green]" if st.ready else "[yellow]not answering[/yellow]"
    table.add_row("state", state if st.running else "[red]stopped[/red]")
    table.add_row("pid", str(st.pid) if st.pid else "-")
    if st.stale_pid is not None:
        table.add_row("stale PID file", f"pid {st.stale_pid} is not running (`store up` clears it)")
    table.add_row("endpoint", st.endpoint)
    table.add_row("env file", str(st.env_file) if st.env_file.is_file() else "- (not created yet)")
    table.add_row("data", str(st.data_dir))
    table.add_row("log", str(st.log_file))
    console.print(table, soft_wrap=True)
    if not st.running:
        raise typer.Exit(1)


@app.command()
def env(home: Path | None = _HOME) -> None:
    """Print `export AWS_...` lines for the server; use: eval "$(patchgap store env)"."""
    server = _server(home)
    if not server.env_file.is_file():
        raise StoreError(
            f"{server.env_file}: no credentials yet; start the server first: patchgap store up"
        )
    for key, value in server.env().items():
        typer.echo(f"export {key}={shlex.quote(value)}")
