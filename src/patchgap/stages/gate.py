"""Stage gate: verify every candidate with r_task, keep the feasible one with the lowest NLL under
pi0, fall back to the reference solution otherwise, and write D_R with provenance and a report.

With several candidates per record (best-of-n: the rewrite stage's greedy one and n samples),
every candidate is scored and the lowest-NLL feasible one is kept, whichever way it was made."""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from patchgap.answers import extract_answer
from patchgap.config import StrictModel
from patchgap.data.fields import FieldMap, Record
from patchgap.data.rejects import Counts, RejectSink
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import iter_records
from patchgap.fsutil import atomic_path, write_text_atomic
from patchgap.progress import Progress
from patchgap.reports.gate import GateStats, write_report
from patchgap.reward.scoring import GroupRewardScorer, RewardConfig, calibration_sample

log = logging.getLogger("patchgap.stages.gate")

NAME = "gate"
INPUTS = ("dataset", "candidates")
OPTIONAL_INPUTS: tuple[str, ...] = ()
OUTPUTS = ("dataset_r", "report")

D_R_FILE = "d_r.jsonl"
# Everything but the main JSONL sits under "_" folders: patchgap.data.readers skip them, so a stage
# reading the dataset_r folder sees each record exactly once.
PARQUET_FILE = "_parquet/d_r.parquet"
ACCEPTED_FILE = "_accepted/accepted.jsonl"
ACCEPTED_PARQUET = "_accepted/accepted.parquet"

# Per-candidate gate reasons (a candidate that passes gets "feasible", the pick "chosen").
EMPTY = "empty"
NO_FINAL_ANSWER = "no_final_answer"
WRONG_ANSWER = "wrong_answer"
JUDGE_REJECTED = "judge_rejected"
FEASIBLE = "feasible"
CHOSEN = "chosen"
# Record-level reasons for a fallback.
NO_CANDIDATES = "no_candidates"
NONE_FEASIBLE = "none_feasible"


class Config(StrictModel):
    """Settings of the gate stage (defaults: the CPU demo)."""

    # These scoring settings were top-level keys of this section before it had its own.
    moved_keys: ClassVar[Mapping[str, str]] = {
        k: f"reward.{k}"
        for k in (
            "judge",
            "judge_model",
            "judge_chat_template",
            "nll_context",
            "embedder",
            "device",
            "dtype",
            "max_batch_tokens",
            "max_length",
            "share_prefix",
        )
    }

    model: str = Field("smollm2", description="pi0: the model whose NLL and judge are used")
    fields: str | FieldMap = Field(
        "auto", description="field preset or mapping of the dataset (as in the rewrite stage)"
    )
    limit: int | None = Field(None, ge=1, description="use at most this many records")
    reward: RewardConfig = Field(
        # One or two candidates per record: flat length-bucketed batches beat running each
        # record's question prefix once and sharing its KV cache (the RL reward's K-groups).
        default_factory=lambda: RewardConfig(share_prefix=False),
        description="how a candidate is scored: the judge, the NLL under pi0 and the embedder, "
        "the same section as train_rewriter.reward (k and the lambdas do not affect the gate)",
    )
    batch_records: int = Field(32, ge=1, description="records scored together")
    diversity_sample: int = Field(
        1000, ge=2, description="records (seeded sample) for the embedding diversity and distinct-n"
    )
    distinct_n: int = Field(2, ge=1, le=4, description="report distinct-1 .. distinct-n")
    seed: int = Field(0, description="seed of the diversity sample")
    write_parquet: bool = Field(True, description="also write D_R and the subset as Parquet")


# --------------------------------------------------------------------------------------------
# Pure gate logic


@dataclass(frozen=True)
class Decision:
    """What the gate made of one record."""

    status: Literal["accepted", "fallback"]
    solution: str
    candidate_index: int | None
    trial: int | None
    reasons: list[str]
    nll: float | None
    judge_p_yes: float | None
    fallback_reason: str | None = None
    judge_score: float | None = None
    sampling: str | None = None  # how the chosen candidate was made: greedy or sample
    judge_failed: tuple[tuple[str, ...], ...] = ()  # per candidate: unmet reasoning criteria


def candidate_reason(text: str, answer_ok: bool, judge_ok: bool) -> str:
    """Why a candidate is in or out of the feasible set (the report's histogram keys)."""
    if not text.strip():
        return EMPTY
    if not answer_ok:
        return WRONG_ANSWER if extract_answer(text) is not None else NO_FINAL_ANSWER
    if not judge_ok:
        return JUDGE_REJECTED
    return FEASIBLE


def decide(
    reference_solution: str,
    candidates: Sequence[Mapping[str, Any]],
    terms: Sequence[Any],
) -> Decision:
    """Pick the feasible candidate (r_task = 1) with the lowest NLL under pi0, else fall back.

    ``candidates`` are the rewrite stage's dicts (``text``, ``index``, ``trial``); ``terms`` the
    matching :class:`patchgap.reward.rewards.RewardTerms`. A feasible candidate without a finite NLL
    ranks after every scored one; ties go to the earlier candidate.
    """
    reasons = [
        candidate_reason(str(c.get("text", "")), bool(t.answer_ok), bool(t.judge_ok))
        for c, t in zip(candidates, terms, strict=True)
    ]
    feasible = [i for i, t in enumerate(terms) if t.r_task >= 1.0 and reasons[i] == FEASIBLE]
    judge_failed = tuple(tuple(getattr(t, "judge_failed", ()) or ()) for t in terms)
    if not feasible:
        return Decision(
            "fallback",
            reference_solution,
            None,
            None,
            reasons,
            None,
            None,
            NO_CANDIDATES if not candidates else NONE_FEASIBLE,
            judge_failed=judge_failed,
        )

    def key(i: int) -> tuple[float, int]:
        nll = terms[i].nll
        return (nll if nll is not None and math.isfinite(nll) else math.inf, i)

    best = min(feasible, key=key)
    reasons[best] = CHOSEN
    cand = candidates[best]
    return Decision(
        "accepted",
        str(cand["text"]),
        int(cand.get("index", best)),
        int(cand.get("trial", 0)),
        reasons,
        terms[best].nll,
        terms[best].judge_p_yes,
        judge_score=getattr(terms[best], "judge_score", None),
        sampling=cand.get("sampling"),
        judge_failed=judge_failed,
    )


def d_r_row(
    rec: Record, decision: Decision, num_candidates: int, trials: int, nll_reference: float | None
) -> dict[str, Any]:
    """One D_R line: the record with the chosen solution and its provenance."""
    return {
        "id": rec.id,
        "question": rec.question,
        "solution": decision.solution,
        "answer": rec.answer,
        "meta": rec.meta,
        "provenance": {
            "status": decision.status,
            "candidate_index": decision.candidate_index,
            "trial": decision.trial,
            "trials": trials,
            "num_candidates": num_candidates,
            "gate_reasons": decision.reasons,
            "fallback_reason": decision.fallback_reason,
            "nll_pi0": _finite(decision.nll if decision.status == "accepted" else nll_reference),
            "nll_reference": _finite(nll_reference),
            "judge_p_yes": _finite(decision.judge_p_yes),
            "judge_score": _finite(decision.judge_score),
            "sampling": decision.sampling,
        },
    }


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------------------------
# Reading candidates


class CandidateIndex:
    """Byte offsets of every candidates line by record id, over all shard files of a folder.

    Only the offsets stay in memory; a record's candidates are read when its batch is gated.
    """

    def __init__(self, root: Path) -> None:
        files = (
            [root]
            if root.is_file()
            else sorted(
                p
                for p in root.rglob("*.jsonl")
                if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts)
                and p.name != "rejects.jsonl"
            )
        )
        self.files = files
        self.offsets: dict[str, tuple[int, int]] = {}
        self.duplicates = 0
        self.candidates = 0  # over all records, the progress bar's total
        for fi, path in enumerate(files):
            with path.open("rb") as fh:
                pos = fh.tell()
                for line in iter(fh.readline, b""):
                    if line.strip():
                        row = json.loads(line)
                        rid = str(row["id"])
                        if rid in self.offsets:
                            self.duplicates += 1  # a shard run twice: the first copy wins
                        else:
                            self.offsets[rid] = (fi, pos)
                            self.candidates += len(row.get("candidates") or [])
                    pos = fh.tell()
        self._handles: dict[int, Any] = {}

    def get(self, rid: str) -> dict[str, Any] | None:
        where = self.offsets.get(rid)
        if where is None:
            return None
        fi, pos = where
        fh = self._handles.get(fi)
        if fh is None:
            fh = self._handles[fi] = self.files[fi].open("rb")
        fh.seek(pos)
        return json.loads(fh.readline())

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def _batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    while True:
        batch = list(itertools.islice(records, size))
        if not batch:
            return
        yield batch


# --------------------------------------------------------------------------------------------
# The stage


def _scorer(config: Config) -> Any:
    return GroupRewardScorer(config.reward, config.model)


def run(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
) -> dict[str, float]:
    """Gate ``candidates`` against ``dataset`` into ``dataset_r`` and a ``report``."""
    out = Path(outputs["dataset_r"])
    report_dir = Path(outputs["report"])
    out.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    index = CandidateIndex(Path(inputs["candidates"]))
    log.info("gate: %d records with candidates in %d file(s)", len(index.offsets), len(index.files))
    scorer = _scorer(config)
    scorer.load()  # a judge with unresolvable YES/NO tokens fails here, before any work
    tokenizer = scorer.nll.tokenizer
    spec = DatasetSpec(source=str(inputs["dataset"]), fields=config.fields, limit=config.limit)
    if config.reward.active_judge == "pi0_calibrated":
        _calibrate_judge(scorer, config, spec)
    stats = GateStats(
        config.diversity_sample, config.seed, config.distinct_n, judge=scorer.describe_judge()
    )
    counts = Counts()
    seen: set[str] = set()
    try:
        # The accepted file is entered first so that it is moved into place last, after D_R.
        with (
            atomic_path(out / ACCEPTED_FILE) as tmp_acc,
            atomic_path(out / D_R_FILE) as tmp_dr,
            RejectSink(out / "_rejects.jsonl") as sink,
            tmp_dr.open("w", encoding="utf-8") as f_dr,
            tmp_acc.open("w", encoding="utf-8") as f_acc,
            Progress("gate", "candidates", total=index.candidates) as bar,
        ):
            for batch in _batches(iter_records(spec, sink, counts), config.batch_records):
                scored = 0
                for row in _gate_batch(batch, index, scorer, tokenizer, stats):
                    seen.add(row["id"])
                    scored += row["provenance"]["num_candidates"]
                    line = json.dumps(row, ensure_ascii=False) + "\n"
                    f_dr.write(line)
                    if row["provenance"]["status"] == "accepted":
                        f_acc.write(line)
                bar.update(scored, accepted=f"{stats.accepted}/{stats.records}")
            rejected = sink.total
    finally:
        index.close()
    unknown = sum(1 for rid in index.offsets if rid not in seen)
    if config.write_parquet:
        jsonl_to_parquet(out / D_R_FILE, out / PARQUET_FILE)
        jsonl_to_parquet(out / ACCEPTED_FILE, out / ACCEPTED_PARQUET)
    write_text_atomic(out / "README.md", _README)
    stats.embed_diversity(scorer.embedder)
    extra = {
        "rejected_records": rejected,
        "candidates_without_record": unknown,
        "duplicate_candidate_lines": index.duplicates,
        "nll_context": config.reward.nll_context,
        "judge": config.reward.judge,
        "judge_kind": config.reward.active_judge or "off",
        **{f"judge_calibration_{k}": v for k, v in scorer.calibration.items()},
        "model": config.model,
    }
    metrics = write_report(stats, report_dir, extra)
    metrics.update(
        {
            "rejected_records": float(rejected),
            "candidates_without_record": float(unknown),
        }
    )
    log.info(
        "gate: %d records, acceptance %.1f%%, %d fallbacks, NLL gap %.3f (accepted only: %.3f "
        "[%.3f, %.3f] over %d records)",
        stats.records,
        100 * metrics["acceptance_rate"],
        stats.fallback,
        metrics["nll_gap"],
        metrics["nll_gap_accepted"],
        metrics["nll_gap_accepted_low"],
        metrics["nll_gap_accepted_high"],
        int(metrics["nll_gap_accepted_n"]),
    )
    return metrics


def _calibrate_judge(scorer: Any, config: Config, spec: Any) -> None:
    """Set the pi0_calibrated judge's threshold on the reference solutions of the records whose
    ids have the smallest sha256 (one pass over the dataset; the same references the
    train-rewriter stage picks from the same D)."""
    # Rejected records are reported by the main pass; this one only looks for references.
    records = (r for r in iter_records(spec, RejectSink(None)) if r.solution)
    sample = calibration_sample(
        records, config.reward.judge_calibration.references, key=lambda r: r.id
    )
    scorer.calibrate(
        [r.question for r in sample], [r.answer for r in sample], [r.solution for r in sample]
    )


def _gate_batch(
    batch: Sequence[Record], index: CandidateIndex, scorer: Any, tokenizer: Any, stats: Any
) -> list[dict[str, Any]]:
    rows = [index.get(r.id) for r in batch]
    cands = [list(row["candidates"]) if row is not None else [] for row in rows]
    texts = [[str(c.get("text", "")) for c in cs] for cs in cands]
    questions = [r.question for r in batch]
    terms = scorer.score_groups(
        questions,
        [r.answer for r in batch],
        texts,
        reference_solutions=[r.solution for r in batch],
    )
    ref_nll = [g[0] for g in scorer.nll.score_groups(questions, [[r.solution] for r in batch])]
    out = []
    for rec, cs, ts, nll_ref in zip(batch, cands, terms, ref_nll, strict=True):
        decision = decide(rec.solution, cs, ts)
        trials = 1 + max((int(c.get("trial", 0)) for c in cs), default=-1)
        row = d_r_row(rec, decision, len(cs), trials, nll_ref)
        stats.add(
            rec,
            decision,
            nll_ref,
            n_tokens=len(tokenizer(decision.solution, add_special_tokens=False)["input_ids"]),
            ref_tokens=len(tokenizer(rec.solution, add_special_tokens=False)["input_ids"]),
        )
        out.append(row)
    return out


def jsonl_to_parquet(src: Path, dest: Path, rows_per_group: int = 1000) -> int:
    """Stream a D_R JSONL into Parquet (``meta`` as JSON text so every row shares one schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prov = pa.struct(
        [
            ("status", pa.string()),
            ("candidate_index", pa.int64()),
            ("trial", pa.int64()),
            ("trials", pa.int64()),
            ("num_candidates", pa.int64()),
            ("gate_reasons", pa.list_(pa.string())),
            ("fallback_reason", pa.string()),
            ("nll_pi0", pa.float64()),
            ("nll_reference", pa.float64()),
            ("judge_p_yes", pa.float64()),
            ("judge_score", pa.float64()),
            ("sampling", pa.string()),
        ]
    )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("question", pa.string()),
            ("solution", pa.string()),
            ("answer", pa.string()),
            ("meta", pa.string()),
            ("provenance", prov),
        ]
    )
    n = 0
    with (
        atomic_path(dest) as tmp,
        pq.ParquetWriter(tmp, schema) as writer,
        src.open(encoding="utf-8") as fh,
    ):
        while True:
            lines = list(itertools.islice(fh, rows_per_group))
            if not lines:
                break
            rows = [json.loads(line) for line in lines]
            for r in rows:
                r["meta"] = json.dumps(r.get("meta") or {}, ensure_ascii=False, default=str)
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            n += len(rows)
        if n == 0:
            writer.write_table(schema.empty_table())
    return n


_README = """\
# D_R: the rewritten dataset

- `d_r.jsonl`: every input record exactly once (id, question, solution, answer, meta, provenance).
  `solution` is the accepted rewrite, or the reference solution when the gate fell back.
- `_parquet/d_r.parquet`: the same rows as Parquet (`meta` as JSON text).
- `_accepted/accepted.jsonl` and `.parquet`: the accepted-only subset.
- `_rejects.jsonl`: input records that could not be read (when any).

`provenance`: status (accepted | fallback), candidate_index, trial, trials, num_candidates,
gate_reasons (one per candidate: chosen, feasible, wrong_answer, no_final_answer,
judge_rejected, empty), fallback_reason, nll_pi0 (mean token NLL of `solution` under pi0),
nll_reference (of the reference solution), judge_p_yes (a model judge's P(YES) share),
judge_score (what the judge thresholds: P(YES) - P(NO), or the reasoning check's score),
sampling (greedy or sample: how the chosen candidate was generated).

Load with `datasets`: `load_dataset("json", data_files="d_r.jsonl")` or
`load_dataset("parquet", data_files="_parquet/d_r.parquet")`.
"""


if __name__ == "__main__":
    from patchgap.stages.base import main

    raise SystemExit(main(sys.modules[__name__]))
