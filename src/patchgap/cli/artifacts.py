"""``patchgap artifacts ls|get RUN``: a run's outputs under ``s3://<bucket>/runs/<run-id>/``."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from patchgap.cli.output import OUTPUT_FORMAT, Format, Output
from patchgap.errors import ConfigError, StoreError
from patchgap.fsutil import refuse_output_over_input
from patchgap.names import check_bucket, check_run_id

if TYPE_CHECKING:
    from patchgap.storage.store import Manifest, Store

app = typer.Typer(help="List and download a run's outputs, verified by their manifests.")
console = Console()

_BUCKET = typer.Option(
    None, "--bucket", help="Bucket holding runs/. Default: $PATCHGAP_BUCKET, else patchgap."
)
_ROOT = typer.Option(
    None,
    "--root",
    help="Folder holding the runs (s3://..., file://... or a path). Default: s3://<bucket>/runs.",
)


def run_prefix(run: str, bucket: str | None = None, root: str | None = None) -> str:
    """The URI of one run's outputs; run ids are single path components."""
    check_run_id(run)
    # Deferred: kept out of the CLI's start-up.
    from patchgap.storage.store import join_uri

    if root is None:
        bucket = check_bucket(bucket or os.environ.get("PATCHGAP_BUCKET") or "patchgap")
        root = f"s3://{bucket}/runs"
    return join_uri(root, run) + "/"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _outputs(store: Store, prefix: str, keys: list[str]) -> dict[str, Manifest]:
    """Manifests under the run, by the folder (relative to the run) they cover."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.storage.store import MANIFEST_NAME, join_uri

    found = {}
    for key in keys:
        path = PurePosixPath(key)
        if path.name == MANIFEST_NAME:
            folder = "" if str(path.parent) == "." else str(path.parent)
            manifest = store.read_manifest(join_uri(prefix, folder))
            if manifest is not None:
                found[folder] = manifest
    return found


def _covered(manifests: dict[str, Manifest]) -> dict[str, int]:
    """Expected size of every key (relative to the run) that some manifest lists."""
    out = {}
    for folder, manifest in manifests.items():
        for key, entry in manifest.files.items():
            out[f"{folder}/{key}" if folder else key] = entry.size
    return out


def _run_objects(run: str, bucket: str | None, root: str | None) -> tuple[str, Any, list, dict]:
    """A run's prefix, a store, its objects and the manifests of its outputs."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.storage.store import Store

    prefix = run_prefix(run, bucket, root)
    store = Store.from_env()
    # As readers see it: each output's objects under their manifest keys, old attempts left out.
    objects = store.list_published(prefix)
    if not objects:
        raise StoreError(f"{prefix}: no objects; check the run id and --bucket")
    return prefix, store, objects, _outputs(store, prefix, [o.key for o in objects])


@app.command("ls")
def ls(
    run: Annotated[str, typer.Argument(help="Run id.")],
    bucket: str | None = _BUCKET,
    root: str | None = _ROOT,
    output_format: Format = OUTPUT_FORMAT,
) -> None:
    """List a run's objects with their sizes and whether a manifest covers them."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.storage.store import MANIFEST_NAME

    prefix, store, objects, manifests = _run_objects(run, bucket, root)
    covered = _covered(manifests)
    rows = []
    for obj in objects:
        if PurePosixPath(obj.key).name == MANIFEST_NAME:
            state = "manifest"
        elif obj.key not in covered:
            state = "incomplete"
        elif covered[obj.key] != obj.size:
            state = "size_differs"
        else:
            state = "listed"
        rows.append({"key": obj.key, "size": obj.size, "manifest": state})
    shown = {
        "manifest": "[blue]manifest[/blue]",
        "incomplete": "[yellow]none (incomplete)[/yellow]",
        "listed": "[green]listed[/green]",
    }
    table = Table(title=prefix)
    table.add_column("key")
    table.add_column("size", justify="right")
    table.add_column("manifest")
    for r in rows:
        state = shown.get(r["manifest"]) or (
            f"[red]size differs ({covered[r['key']]} expected)[/red]"
        )
        table.add_row(r["key"], human_size(r["size"]), state)
    total = sum(o.size for o in objects)
    Output(output_format).result(
        {"uri": prefix, "objects": rows, "total_size": total, "complete_outputs": len(manifests)},
        table,
        f"{len(objects)} objects, {human_size(total)}, {len(manifests)} complete output(s)",
    )


@app.command("get")
def get(
    run: Annotated[str, typer.Argument(help="Run id.")],
    dest: Annotated[Path, typer.Argument(help="Local folder to download into.")],
    bucket: str | None = _BUCKET,
    root: str | None = _ROOT,
) -> None:
    """Download a run's complete outputs, verifying every sha256 against its manifest."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.storage.store import MANIFEST_NAME, join_uri, safe_target

    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"DEST {dest}: not a folder; give a folder to download into")
    refuse_output_over_input(dest, [root], "DEST")
    prefix, store, objects, manifests = _run_objects(run, bucket, root)
    if not manifests:
        raise StoreError(f"{prefix}: no manifest, so no output of this run is complete yet")

    count = size = 0
    for folder in sorted(manifests):
        target = safe_target(dest, folder) if folder else dest
        manifest = store.download_dir(join_uri(prefix, folder), target)
        count += len(manifest.files)
        size += manifest.total_size
        console.print(f"verified {folder or '.'}: {len(manifest.files)} files")
    covered = _covered(manifests)
    skipped = [
        o.key
        for o in objects
        if o.key not in covered and PurePosixPath(o.key).name != MANIFEST_NAME
    ]
    for key in skipped:
        console.print(f"[yellow]skipped {key}: no manifest lists it (incomplete output)[/yellow]")
    console.print(f"downloaded {count} files ({human_size(size)}) to {dest}, all checksums match")


@app.command("report")
def report(
    run: Annotated[str, typer.Argument(help="Run id.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Markdown file to write (e.g. docs/results.md); text between its "
            "'patchgap report' marker comments is replaced, the rest kept. Default: print.",
        ),
    ] = None,
    bucket: str | None = _BUCKET,
    root: str | None = _ROOT,
) -> None:
    """Render a run's reproduction report: gate figures, accuracies, forgetting and verdict."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.reports import results

    if out is not None:
        refuse_output_over_input(out, [root], "--out")
    prefix, store, objects, _ = _run_objects(run, bucket, root)
    found = results.collect(store, prefix, {o.key: o.uri for o in objects})
    if out is None:
        console.print(results.render(found), markup=False, highlight=False)
        return
    results.write(found, out)
    console.print(f"wrote {out}")
