"""``patchgap models prepare|ls|info|push``: model folders (aliases, conversion, inspection, upload
to S3 for pods)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from patchgap.cli.output import OUTPUT_FORMAT, Format, Output
from patchgap.errors import ConfigError

app = typer.Typer(
    help="Prepare, inspect and upload model folders.",
    no_args_is_help=True,
)
console = Console()

_CACHE = typer.Option(
    None,
    "--cache-dir",
    help="Folder holding converted models. Default: $PATCHGAP_CACHE_DIR/models.",
)


_INFO_PATH = typer.Argument(..., help="A model folder, or a prepared alias (smollm2).")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


@app.command()
def prepare(
    name: str = typer.Argument(..., help="Alias of the model to prepare, e.g. smollm2."),
    force: bool = typer.Option(False, "--force", help="Convert again even when prepared."),
    cache_dir: Path | None = _CACHE,
) -> None:
    """Convert a known model into a safetensors folder with tokenizer and chat template."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.lm import models

    spec = models.known_model(name)
    if spec is None:
        models.prepare_model(name)  # raises the one-line "unknown alias" error
        return
    folder = models.models_cache_dir(cache_dir) / spec.folder
    already = models.is_prepared(folder) and not force
    if not already:
        console.print(f"converting {spec.description} (about a minute on 2 CPU cores) ...")
    started = time.perf_counter()
    path = models.prepare_model(spec.alias, cache_dir, force=force)
    took = time.perf_counter() - started
    info = models.prepared_info(path)
    if already:
        console.print(f"{spec.alias}: already prepared ({took:.2f}s)")
    else:
        console.print(f"{spec.alias}: converted in {took:.1f}s")
        console.print(
            f"sanity: {info.get('sanity_prompt')!r} -> {info.get('sanity_output')!r}",
            highlight=False,
        )
    console.print(f"size:   {_mb(models.folder_size(path))}")
    console.print(f"path:   {path}", highlight=False, soft_wrap=True)


@app.command("ls")
def list_models(cache_dir: Path | None = _CACHE, output_format: Format = OUTPUT_FORMAT) -> None:
    """List known model aliases, whether each is prepared, and where."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.lm import models

    rows = []
    for spec in models.KNOWN_MODELS.values():
        folder = models.models_cache_dir(cache_dir) / spec.folder
        rows.append(
            {
                "alias": spec.alias,
                "prepared": models.is_prepared(folder),
                "description": spec.description,
                "path": str(folder),
            }
        )
    table = Table("alias", "prepared", "description")
    table.add_column("path", overflow="fold")
    for r in rows:
        table.add_row(r["alias"], "yes" if r["prepared"] else "no", r["description"], r["path"])
    Output(output_format).result(rows, table)


@app.command()
def info(
    path: Path = _INFO_PATH,
) -> None:
    """Show architecture, parameter count, vocabulary and chat template of a model folder."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.lm import models

    folder = path
    spec = models.known_model(str(path)) if not path.exists() else None
    if spec is not None:
        folder = models.models_cache_dir() / spec.folder
        if not models.is_prepared(folder):
            raise ConfigError(
                f"{spec.alias} is not prepared; run `patchgap models prepare {spec.alias}`"
            )
    if not folder.is_dir():
        raise ConfigError(f"model folder {path} does not exist")
    meta = models.model_info(folder)
    params = meta["parameters"]
    rows = [
        ("path", meta["path"]),
        ("architecture", meta["architecture"]),
        ("parameters", f"{params:,}" if params is not None else "unknown (no safetensors)"),
        ("vocab", f"{meta['vocab_size']:,}" if meta["vocab_size"] else "?"),
        ("dtype", str(meta["dtype"])),
        ("chat template", "yes" if meta["chat_template"] else "no"),
        ("size", _mb(meta["bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        console.print(f"{key:<{width}}  {value}", highlight=False, soft_wrap=True)


@app.command()
def push(
    name: str = typer.Argument(..., help="Alias (smollm2), model folder or hub id."),
    uri: str = typer.Argument(..., help="s3:// prefix, e.g. s3://patchgap/models/smollm2"),
) -> None:
    """Upload a model folder to S3 with its manifest; stages then accept the s3:// URI as model."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.lm import models

    if not uri.startswith("s3://"):
        raise ConfigError(f"push target {uri!r} is not an s3:// URI")
    folder = models.push_model(name, uri)
    console.print(
        f"{name}: {_mb(models.folder_size(folder))} uploaded to {uri}",
        highlight=False,
        soft_wrap=True,
    )
