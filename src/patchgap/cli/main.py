"""Entry point of the ``patchgap`` command: registers the command groups and turns user
mistakes (:class:`~patchgap.errors.PatchgapError`, and the OS, S3, YAML, JSON and safetensors
errors that :func:`patchgap.errors.user_message` maps) into one clear line and exit code 2."""

from __future__ import annotations

import sys

import click
import typer
from typer.core import TyperGroup

from patchgap import __version__
from patchgap.cli import print_error
from patchgap.errors import PatchgapError, user_message


class _OneLineErrors(TyperGroup):
    """The root group: every command runs inside it, so an error a user can cause becomes one
    line and exit code 2 here, once, for the console script and for ``CliRunner`` alike."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:  # noqa: BLE001 - mapped or re-raised just below
            message = user_message(err)
            if message is None:
                raise
            print_error(message)
            raise typer.Exit(2) from None


cli = typer.Typer(
    cls=_OneLineErrors,
    name="patchgap",
    help="Rewrite an SFT dataset with an RL-trained rewriter so fine-tuning forgets less.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@cli.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """patchgap: train-rewriter, rewrite, gate, sft, evaluate."""


def _register() -> None:
    # Imported here so that a broken optional group never hides the others' --help.
    from patchgap.cli import artifacts, cluster, data, demo, models, pipeline, stage, store

    cli.add_typer(store.app, name="store")
    cli.add_typer(models.app, name="models")
    cli.add_typer(data.app, name="data")
    cli.add_typer(artifacts.app, name="artifacts")
    cli.command("demo")(demo.demo)
    cli.command("stage")(stage.stage)
    cli.command("run")(pipeline.run)
    cli.command("compile")(pipeline.compile_pipelines)
    cli.command("submit")(cluster.submit)
    cli.add_typer(cluster.runs_app, name="runs")
    cli.add_typer(cluster.schedule_app, name="schedule")
    cli.command("doctor")(cluster.doctor)


_register()


def app() -> None:
    """Console-script entry: run the CLI, printing user errors as one line."""
    try:
        cli(standalone_mode=True)
    except PatchgapError as err:  # raised outside a command (while parsing, in a callback)
        print_error(user_message(err))
        sys.exit(2)


if __name__ == "__main__":
    app()
