"""``patchgap data validate|stage|ls``: check a dataset against the data contract, stage an
external dataset with a manifest, list the named sets."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.table import Table

from patchgap.cli import print_error
from patchgap.cli.output import OUTPUT_FORMAT, Format, Output
from patchgap.errors import PatchgapError
from patchgap.fsutil import refuse_output_over_input
from patchgap.settings import DATA_DIR_ENV, data_dir

app = typer.Typer(
    help="Validate datasets (counts, rejects with line and reason) and list the named sets.",
    no_args_is_help=True,
)


def _fields(value: str) -> object:
    """A preset name, or a YAML/JSON file holding a FieldMap."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.config import read_yaml, validate
    from patchgap.data.fields import FieldMap

    if value.endswith((".yaml", ".yml", ".json")) or Path(value).is_file():
        return validate(FieldMap, read_yaml(value), value)
    return value


def _default_rejects(source: str) -> Path:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"\.(jsonl|json|parquet)$", "", name)
    return Path(re.sub(r"[^\w.-]+", "_", name) + ".rejects.jsonl")


_SOURCE = typer.Argument(
    ..., help="File or folder, s3:// URI, named set (see `patchgap data ls`) or hf://owner/name."
)
_FIELDS = typer.Option(
    "auto", "--fields", "-f", help="Field preset (gsm8k, math, messages, ...) or a FieldMap YAML."
)
_REJECTS = typer.Option(
    None, "--rejects", help="Where rejected records go (JSONL). Default: ./<name>.rejects.jsonl"
)
_LIMIT = typer.Option(None, "--limit", min=1, help="Use at most N valid records (a seeded subset).")
_SPLIT = typer.Option(None, "--split", help="Split of a named set or hub dataset.")
_SEED = typer.Option(0, "--seed", help="Seed of the subset taken with --limit.")
_HUB_CONFIG = typer.Option(None, "--hub-config", help="Config of an hf:// dataset (its card).")


def _spec(
    source: str,
    fields: str,
    limit: int | None,
    split: str | None,
    seed: int,
    hub_config: str | None = None,
) -> object:
    # Deferred: kept out of the CLI's start-up.
    from patchgap.config import validate as validate_config
    from patchgap.data.sources import DatasetSpec

    values = {"source": source, "fields": _fields(fields), "limit": limit, "split": split}
    values = {**values, "seed": seed, "hub_config": hub_config}
    return validate_config(DatasetSpec, values, f"dataset {source}")


def _fail(err: PatchgapError) -> typer.Exit:
    print_error(err)
    return typer.Exit(2)


@app.command()
def validate(
    source: str = _SOURCE,
    fields: str = _FIELDS,
    rejects: Path | None = _REJECTS,
    limit: int | None = _LIMIT,
    split: str | None = _SPLIT,
    seed: int = _SEED,
    hub_config: str | None = _HUB_CONFIG,
    output_format: Format = OUTPUT_FORMAT,
) -> None:
    """Read a dataset, count valid and rejected records; exit 0 when it could be read and holds
    at least one valid record, 2 otherwise."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.data.fields import describe_mapping
    from patchgap.data.stream import load_records

    out = Output(output_format)
    target = rejects or _default_rejects(source)
    refuse_output_over_input(target, [source], "--rejects")
    try:
        spec = _spec(source, fields, limit, split, seed, hub_config)
        result = load_records(spec, target, external=True)
    except PatchgapError as err:
        raise _fail(err) from None
    c = result.counts
    data = {
        "source": c.source,
        "fields": c.fields,
        "read": c.read,
        "valid": c.valid,
        "rejected": c.rejected_total,
        "rejected_by_kind": dict(sorted(c.rejected.items())),
        "selected": c.selected if limit is not None else None,
        "rejects_path": str(result.rejects_path) if result.rejects_path else None,
        # The mapping used and what it made of one record: a wrong mapping shows at once.
        "mapping": describe_mapping(c.field_map) if c.field_map else None,
        "sample": _sample(result.records[0]) if result.records else None,
    }
    table = Table()
    table.add_column("records")
    table.add_column("count", justify="right")
    table.add_row("read", str(c.read))
    table.add_row("valid", str(c.valid))
    table.add_row("rejected", str(c.rejected_total))
    for kind, n in sorted(c.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(f"  {kind}", str(n))
    if limit is not None:
        table.add_row("selected", str(c.selected))
    where = (
        f"rejects: {c.rejected_total} written to {result.rejects_path}"
        if result.rejects_path is not None
        else "rejects: none"
    )
    shown = [f"{c.source}  fields: {c.fields}", table, where]
    if data["mapping"]:
        shown.append("mapping: " + ", ".join(f"{k} <- {v}" for k, v in data["mapping"].items()))
    if data["sample"]:
        shown.append("sample: " + " | ".join(f"{k}: {v!r}" for k, v in data["sample"].items()))
    out.result(data, *shown)
    if c.valid == 0:
        raise _fail(PatchgapError(f"{c.source}: no valid records ({c.read} read, all rejected)"))


def _sample(record: object) -> dict[str, str]:
    """A record's parts, each cut to one readable line."""
    parts = {k: str(getattr(record, k)) for k in ("id", "question", "solution", "answer")}
    return {k: v if len(v) <= 120 else v[:117] + "..." for k, v in parts.items()}


@app.command()
def stage(
    source: str = _SOURCE,
    dest: str = typer.Argument(..., help="s3:// prefix or folder for the staged copy."),
    fields: str = _FIELDS,
    limit: int | None = _LIMIT,
    split: str | None = _SPLIT,
    seed: int = _SEED,
    hub_config: str | None = _HUB_CONFIG,
) -> None:
    """Stage an external dataset (one without a patchgap manifest) for the stages: validate it
    and write its records (records.jsonl, and _rejects.jsonl when any) under DEST with a
    manifest."""
    import tempfile

    # Deferred: kept out of the CLI's start-up.
    from patchgap.data.stream import load_records
    from patchgap.data.writers import write_records_jsonl
    from patchgap.storage.store import Store

    refuse_output_over_input(dest, [source], "DEST")
    with tempfile.TemporaryDirectory(prefix="patchgap-stage-data-") as tmp:
        folder = Path(tmp)
        try:
            spec = _spec(source, fields, limit, split, seed, hub_config)
            # "_" marks bookkeeping: a reader of the staged folder never takes it as records.
            result = load_records(spec, folder / "_rejects.jsonl", external=True)
            if not result.records:
                raise PatchgapError(f"{source}: no valid records ({result.counts.read} read)")
            write_records_jsonl(result.records, folder / "records.jsonl")
            meta = {"source": source, "fields": result.counts.fields, "staged": len(result.records)}
            Store.from_env().upload_dir(folder, dest, meta)
        except PatchgapError as err:
            raise _fail(err) from None
    c = result.counts
    typer.echo(f"{dest}: {len(result.records)} records staged ({c.rejected_total} rejected)")


@app.command("ls")
def list_sets(output_format: Format = OUTPUT_FORMAT) -> None:
    """List the named public sets and whether each resolves in the data directory."""
    # Deferred: kept out of the CLI's start-up.
    from patchgap.data.registry import SOURCE_ROLES, named_sets

    root = data_dir()
    rows = []
    for entry in named_sets(*SOURCE_ROLES).values():
        for split, rel in entry.paths.items():
            rows.append(
                {
                    "name": entry.name if len(entry.paths) == 1 else f"{entry.name}:{split}",
                    "fields": entry.preset,
                    "local": root is not None and (root / rel).exists(),
                    "hub": entry.hub,
                    "note": entry.note,
                }
            )
    table = Table()
    for col in ("name", "fields", "local", "hub", "note"):
        table.add_column(col, no_wrap=col in ("name", "local"))
    for r in rows:
        local = "[green]yes[/green]" if r["local"] else "[red]no[/red]"
        table.add_row(r["name"], r["fields"], local, r["hub"] or "-", r["note"])
    where = str(root) if root is not None else f"none (set {DATA_DIR_ENV})"
    Output(output_format).result(
        {"data_dir": str(root) if root is not None else None, "sets": rows},
        f"data directory: {where}",
        table,
    )
