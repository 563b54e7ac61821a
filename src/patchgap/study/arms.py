"""The study's training sets ("arms"), built from D, the gates' outputs and a swap pool: one
folder ``<arm>/data.jsonl`` per arm (id, question, solution, answer) and ``arms.json`` that
describes each arm and lists the SFT jobs (arm x seed).

The gate's files are read as the gate stage writes them (``d_r.jsonl``, ``_accepted/
accepted.jsonl``); this package sits below the stages, so the names are repeated here and a test
keeps them equal.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from patchgap.data.fields import Record
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import load_records
from patchgap.errors import ConfigError, DataError
from patchgap.fsutil import write_text_atomic
from patchgap.study.config import ARMS, StudySettings

#: What the gate stage writes into its dataset_r folder (patchgap.stages.gate).
D_R_FILE = "d_r.jsonl"
ACCEPTED_FILE = "_accepted/accepted.jsonl"

ARMS_JSON = "arms.json"
DATA_FILE = "data.jsonl"


def normalise_question(text: str) -> str:
    """A question as the swap draw compares it: case and runs of whitespace do not count."""
    return " ".join(text.split()).lower()


def read_d(d_dir: Path) -> list[Record]:
    """D as the pipeline staged it (a records folder or file)."""
    result = load_records(DatasetSpec(source=str(d_dir)))
    if not result.records:
        raise DataError(f"{d_dir}: D has no records")
    return result.records


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"{path}: missing (not a gate's dataset_r output?)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise DataError(f"{path}:{n}: not JSON ({err})") from None
    return rows


def _record(row: dict[str, Any]) -> Record:
    return Record(
        id=str(row["id"]),
        question=str(row["question"]),
        solution=str(row["solution"]),
        answer=str(row.get("answer", "")),
    )


def _plain(records: Iterable[Record]) -> list[Record]:
    """The four training fields only (the gate's provenance stays in the gate's output)."""
    return [Record(r.id, r.question, r.solution, r.answer) for r in records]


def draw_swap(
    pool: Sequence[Record], d: Sequence[Record], k: int, seed: int, pool_name: str
) -> list[Record]:
    """``k`` pool records that are not in D by id or by (normalised) question, in a seeded
    order; the first ``k`` of that order, so a smaller draw is part of a larger one."""
    ids = {r.id for r in d}
    questions = {normalise_question(r.question) for r in d}
    eligible, seen = [], set()
    for rec in sorted(pool, key=lambda r: r.id):
        q = normalise_question(rec.question)
        if rec.id in ids or q in questions or q in seen or not rec.solution.strip():
            continue
        seen.add(q)
        eligible.append(rec)
    if len(eligible) < k:
        raise ConfigError(
            f"study.swap_pool {pool_name}: {len(eligible)} records outside D, the swap arms need "
            f"{k}; give a larger pool"
        )
    random.Random(seed).shuffle(eligible)
    return eligible[:k]


def _gate_arms(gate_dir: Path, by_id: dict[str, Record]) -> tuple[list[Record], ...]:
    """(D_R, references of the accepted records, accepted rewrites) of one gate's output."""
    dr = [_record(row) for row in _read_rows(gate_dir / D_R_FILE)]
    accepted = [_record(row) for row in _read_rows(gate_dir / ACCEPTED_FILE)]
    missing = [r.id for r in accepted if r.id not in by_id]
    if missing:
        raise DataError(f"{gate_dir / ACCEPTED_FILE}: record {missing[0]!r} is not in D")
    refs = [by_id[r.id] for r in accepted]
    return dr, refs, accepted


def build_arms(
    d_dir: Path,
    gate_rl_dir: Path,
    gate_prompt_dir: Path | None,
    swap_pool_records: Sequence[Record],
    settings: StudySettings,
    out_dir: Path,
) -> dict[str, Any]:
    """Write one folder per arm of ``settings.arms`` and ``arms.json`` into ``out_dir``; returns
    what ``arms.json`` holds: {"arms": {arm: {records, ids, description, rewriter, kind,
    epochs}}, "jobs": [{arm, seed, epochs}]}. An arm with no records (its gate accepted none)
    is described with the reason and gets no job."""
    needs_prompt = settings.needs_prompt_gate()
    if needs_prompt and gate_prompt_dir is None:
        raise ConfigError(
            f"study.arms: {', '.join(needs_prompt)} need the prompt-only gate, which did not run"
        )
    d = _plain(read_d(d_dir))
    by_id = {r.id: r for r in d}
    sets: dict[str, list[Record]] = {"d": d}
    gates = {"rl": gate_rl_dir, "prompt": gate_prompt_dir}
    for rewriter, folder in gates.items():
        if folder is None:
            continue
        suffix = "" if rewriter == "rl" else "_prompt"
        dr, refs, rewrites = _gate_arms(Path(folder), by_id)
        sets[f"dr{suffix}"] = _plain(dr)
        sets[f"ref_{rewriter}"] = refs
        sets[f"rw_{rewriter}"] = _plain(rewrites)
    swap_k = {r: len(sets[f"ref_{r}"]) for r in gates if f"swap_{r}" in settings.arms}
    if swap_k:
        pool_name = settings.swap_pool.source
        drawn = draw_swap(swap_pool_records, d, max(swap_k.values()), settings.swap_seed, pool_name)
        for rewriter, k in swap_k.items():
            sets[f"swap_{rewriter}"] = drawn[:k]
    return _write(sets, settings, Path(out_dir))


def _write(sets: dict[str, list[Record]], settings: StudySettings, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    described: dict[str, Any] = {}
    jobs = []
    for arm in settings.arms:
        kind, rewriter, description = ARMS[arm]
        records = sets[arm]
        entry: dict[str, Any] = {
            "records": len(records),
            "ids": [r.id for r in records],
            "description": description,
            "rewriter": rewriter,
            "kind": kind,
            "epochs": settings.epochs_of(arm),
        }
        if records:
            _write_jsonl(records, out_dir / arm / DATA_FILE)
            jobs += [
                {"arm": arm, "seed": seed, "epochs": entry["epochs"]} for seed in settings.seeds
            ]
        else:
            entry["skipped"] = "no records (the gate accepted none)"
        described[arm] = entry
    out = {"arms": described, "jobs": jobs}
    write_text_atomic(out_dir / ARMS_JSON, json.dumps(out, indent=2) + "\n")
    return out


def _write_jsonl(records: Sequence[Record], path: Path) -> None:
    """The four training fields per line, as the spec of an arm has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (
        json.dumps(
            {"id": r.id, "question": r.question, "solution": r.solution, "answer": r.answer},
            ensure_ascii=False,
        )
        for r in records
    )
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def load_swap_pool(settings: StudySettings) -> list[Record]:
    """The swap pool's records (a named set resolves through the data directory)."""
    return load_records(settings.swap_pool).records
