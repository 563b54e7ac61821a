"""Stage rewrite: the rewriter (pi0 + LoRA adapter, or pi0 alone as the prompt-only baseline)
generates candidate rewrites for every record, sharded, streamed and resumable batch by batch.

Candidates per record: one greedy (the original code's way, ``generation.temperature: 0``), or
``generation.n`` samples, or both for best-of-n (``include_greedy`` with a sampling temperature:
the greedy rewrite plus n samples); the gate keeps the feasible one with the lowest NLL. Each
candidate records how it was made (``sampling``: greedy or sample)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from patchgap.answers import equivalent
from patchgap.config import StrictModel
from patchgap.data.fields import FieldMap, Record
from patchgap.data.rejects import Counts, RejectSink
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import iter_records
from patchgap.fsutil import atomic_path, write_text_atomic
from patchgap.lm.generation import GenerationConfig, adapter_fingerprint, make_generator
from patchgap.lm.models import apply_chat, load_tokenizer
from patchgap.progress import Progress
from patchgap.prompts import REWRITE_TEMPLATE, rewrite_messages
from patchgap.stages import resume
from patchgap.stages.base import path_hash
from patchgap.stages.resume import LeftOut, StageState

log = logging.getLogger("patchgap.stages.rewrite")

NAME = "rewrite"
INPUTS = ("dataset", "adapter")
OPTIONAL_INPUTS = ("adapter",)
OUTPUTS = ("candidates",)

#: Bumped when the layout of a finished batch changes, so old state is not reused.
STATE_FORMAT = 1


class Config(StrictModel):
    """Settings of the rewrite stage (defaults: the CPU demo)."""

    # Every generation setting was a top-level key of this section before it had its own.
    moved_keys: ClassVar[Mapping[str, str]] = {
        k: f"generation.{k}" for k in GenerationConfig.model_fields
    }

    model: str = Field("smollm2", description="pi0: a model folder or a known name (smollm2)")
    fields: str | FieldMap = Field(
        "auto", description="field preset or mapping of the dataset (see patchgap.data.fields)"
    )
    limit: int | None = Field(None, ge=1, description="use at most this many records")
    template: str = Field(REWRITE_TEMPLATE, description="rewriting prompt ({question}, {solution})")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig,
        description="backend, decoding (n candidates per record; temperature 0 = greedy, n 1), "
        "batching, seed, device and dtype of the rewriter (patchgap.lm.generation)",
    )
    include_greedy: bool = Field(
        False,
        description="best-of-n: also generate the greedy rewrite besides the generation.n "
        "samples (needs generation.temperature > 0); n + 1 candidates per record",
    )
    max_retries: int = Field(
        0, ge=0, description="rounds of new samples for candidates whose final answer is wrong"
    )
    retry_temperature: float = Field(
        0.7, gt=0.0, description="sampling temperature of retries (greedy would repeat itself)"
    )
    batch_records: int = Field(
        32, ge=1, description="records per resumable batch (the most a crash can lose)"
    )
    shard_index: int = Field(0, ge=0, description="this worker's shard (0-based)")
    num_shards: int = Field(1, ge=1, description="how many shards the dataset is split into")
    shard_by: Literal["order", "hash"] = Field(
        "order", description="assign records to shards by position or by a hash of the id"
    )
    state_uri: str | None = Field(
        None,
        description="s3:// prefix or folder where finished batches go as they complete; a "
        "restart skips them (default: a _state folder inside the candidates output)",
    )
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.shard_index >= self.num_shards:
            raise ValueError(
                f"shard_index {self.shard_index} must be < num_shards {self.num_shards}"
            )
        if self.include_greedy and self.generation.temperature == 0.0:
            raise ValueError(
                "include_greedy adds the greedy rewrite to sampled ones, but "
                "generation.temperature is 0 (every candidate is greedy already); set "
                "generation.temperature > 0 (and generation.n samples) or include_greedy: false"
            )
        return self

    @property
    def candidates_per_record(self) -> int:
        """Candidates of the first try: the n samples (or the one greedy), plus the greedy one."""
        return self.generation.n + (1 if self.include_greedy else 0)


#: Fields that change neither which records a batch holds nor what is generated for them;
#: include_greedy off changes nothing, so batches finished before it existed stay valid.
NOT_IN_FINGERPRINT = LeftOut.of(
    "progress",
    "state_uri",
    generation={"device", "batch_size"},
    while_off={"include_greedy"},
)


def shard_of(index: int, record_id: str, num_shards: int, by: str) -> int:
    """Which shard a record belongs to: by position, or by a stable hash of its id."""
    if num_shards == 1:
        return 0
    if by == "order":
        return index % num_shards
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_file_name(shard_index: int, num_shards: int) -> str:
    return f"candidates-{shard_index:05d}-of-{num_shards:05d}.jsonl"


def batch_seed(seed: int, shard: int, batch: int, trial: int) -> int:
    """A seed per (shard, batch, trial): a resumed batch samples exactly as the first try did."""
    blob = f"{seed}/{shard}/{batch}/{trial}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big")


def iter_batches(
    records: Iterator[Record], size: int, shard_index: int, num_shards: int, by: str
) -> Iterator[list[Record]]:
    """This shard's records in dataset order, ``size`` at a time (never more in memory)."""
    mine = (r for i, r in enumerate(records) if shard_of(i, r.id, num_shards, by) == shard_index)
    while True:
        batch = list(itertools.islice(mine, size))
        if not batch:
            return
        yield batch


@dataclass
class Tally:
    """Running figures for the progress bar and the metrics."""

    records: int = 0
    accepted: int = 0
    candidates: int = 0
    candidates_ok: int = 0
    tokens: int = 0
    retries: int = 0
    batches: int = 0
    batches_resumed: int = 0
    generate_seconds: float = 0.0
    started: float = field(default_factory=time.time)

    def add(self, rows: Sequence[dict[str, Any]], generated: bool) -> None:
        self.batches += 1
        self.batches_resumed += 0 if generated else 1
        for row in rows:
            cands = row["candidates"]
            self.records += 1
            self.candidates += len(cands)
            ok = sum(1 for c in cands if c["answer_ok"])
            self.candidates_ok += ok
            self.accepted += 1 if ok else 0
            if generated:
                self.tokens += sum(c["num_tokens"] for c in cands)
                self.retries += sum(1 for c in cands if c["trial"] > 0)

    def postfix(self) -> dict[str, str]:
        elapsed = max(time.time() - self.started, 1e-9)
        gen = max(self.generate_seconds, 1e-9)
        return {
            "rec/s": f"{self.records / elapsed:.2f}",
            "tok/s": f"{self.tokens / gen:.1f}",
            "acc": f"{self.accepted / max(self.records, 1):.1%}",
        }


class RewriteState(StageState):
    """Finished batches under ``<state_uri>/<fingerprint>/shard-i-of-n/`` in the store."""

    stage = NAME
    redo = "regenerating"

    def __init__(self, state_uri: str, fingerprint: str, shard: int, shards: int) -> None:
        super().__init__(state_uri, fingerprint, f"shard-{shard:05d}-of-{shards:05d}")
        self.done = self.kept()

    def uri(self, batch: int) -> str:
        return self.unit_uri(self.key(batch))

    @staticmethod
    def key(batch: int) -> str:
        return f"batch-{batch:06d}.jsonl"

    def load(self, batch: int, ids: list[str]) -> list[dict[str, Any]] | None:
        """The finished rows of ``batch``, or None when absent or not for these records."""
        if self.key(batch) not in self.done:
            return None

        def rows_for_these_records(blob: bytes) -> list[dict[str, Any]]:
            rows = [json.loads(line) for line in blob.decode("utf-8").splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in rows) or [r.get("id") for r in rows] != ids:
                raise ValueError("not the rows of these records")
            return rows

        why = "is corrupt or for other records"
        return self.read_unit(self.key(batch), rows_for_these_records, why)

    def save(self, batch: int, rows: Sequence[dict[str, Any]]) -> None:
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        # One object per batch, written in one put: a crash leaves it whole or absent.
        self.write_unit(self.key(batch), blob)


def fingerprint(config: Config, dataset: Path, adapter: Path | None) -> str:
    """What identifies a run's batches: generation settings, dataset bytes, adapter content."""

    inputs = {
        "format": STATE_FORMAT,
        "dataset": path_hash(dataset),
        "adapter": adapter_fingerprint(adapter) if adapter is not None else None,
    }
    return resume.fingerprint(config, NOT_IN_FINGERPRINT, inputs, length=16)


class Rewriter:
    """Generates and answer-checks candidates for one batch of records, with retries."""

    def __init__(self, config: Config, adapter: Path | None, work: int | None = None) -> None:
        self.config = config
        self.adapter = adapter
        self.work = work  # generations expected: lets backend auto weigh vLLM's engine start
        self.tokenizer = load_tokenizer(
            config.model, trust_remote_code=config.generation.trust_remote_code
        )
        self._generator: Any = None

    @property
    def generator(self) -> Any:
        # Loaded on first use: a fully resumed shard never loads the model.
        if self._generator is None:
            self._generator = make_generator(
                self.config.model, self.adapter, self.config.generation, work=self.work
            )
        return self._generator

    def prompt(self, rec: Record) -> str:
        messages = rewrite_messages(rec.question, rec.solution, self.config.template)
        return apply_chat(self.tokenizer, messages)

    def rewrite(
        self, batch: Sequence[Record], shard: int, batch_index: int
    ) -> list[dict[str, Any]]:
        cfg, gen = self.config, self.config.generation
        prompts = [self.prompt(r) for r in batch]
        cands: list[list[dict[str, Any]]] = [[] for _ in batch]
        need = {i: gen.n for i in range(len(batch))}
        for trial in range(cfg.max_retries + 1):
            todo = {i: k for i, k in need.items() if k > 0}
            if not todo:
                break
            temp = gen.temperature if trial == 0 else (gen.temperature or cfg.retry_temperature)
            # (temperature, candidates wanted per record) for each round of generate calls; the
            # greedy rewrite comes first, so it is candidate 0 of its record.
            rounds = [(temp, todo)]
            if trial == 0 and cfg.include_greedy:
                rounds.insert(0, (0.0, dict.fromkeys(todo, 1)))
            for round_temp, wanted in rounds:
                self._generate_round(
                    batch, prompts, cands, wanted, round_temp, trial, shard, batch_index
                )
            # Only the candidates that failed the answer check get new samples.
            for i in todo:
                need[i] = sum(1 for c in candidates_of_trial(cands[i], trial) if not c["answer_ok"])
        return [
            {
                "id": r.id,
                "question": r.question,
                "solution": r.solution,
                "answer": r.answer,
                "meta": r.meta,
                "candidates": c,
            }
            for r, c in zip(batch, cands, strict=True)
        ]

    def _generate_round(
        self,
        batch: Sequence[Record],
        prompts: Sequence[str],
        cands: list[list[dict[str, Any]]],
        wanted: Mapping[int, int],
        temperature: float,
        trial: int,
        shard: int,
        batch_index: int,
    ) -> None:
        """Generate ``wanted[i]`` candidates for record i at ``temperature``, appended to
        ``cands[i]`` with their answer check."""
        seed = self.config.generation.seed
        sampling = "greedy" if temperature == 0.0 else "sample"
        # Group by how many candidates each record needs, one generate call per group.
        for k, idx in itertools.groupby(
            sorted(wanted, key=lambda i: (wanted[i], i)), key=wanted.get
        ):
            rows = list(idx)
            gens = self.generator.generate(
                [prompts[i] for i in rows],
                n=k,
                seed=batch_seed(seed, shard, batch_index, trial * 1000 + k),
                temperature=temperature,
            )
            for i, outs in zip(rows, gens, strict=True):
                for g in outs:
                    cands[i].append(
                        {
                            "index": len(cands[i]),
                            "trial": trial,
                            "sampling": sampling,
                            "text": g.text,
                            "num_tokens": g.num_tokens,
                            "finish_reason": g.finish_reason,
                            "answer_ok": equivalent(g.text, batch[i].answer),
                        }
                    )

    @property
    def backend(self) -> dict[str, str] | None:
        """The backend the generator took and why (None when nothing was generated)."""
        choice = getattr(self._generator, "choice", None)
        return None if choice is None else {"name": choice.backend, "reason": choice.reason}

    def close(self) -> None:
        if self._generator is not None:
            self._generator.close()


def candidates_of_trial(cands: Sequence[dict[str, Any]], trial: int) -> list[dict[str, Any]]:
    """The candidates of one trial."""
    return [c for c in cands if c["trial"] == trial]


def _line_count(path: Path) -> int:
    """Lines of a text file, the last one counted whether or not it ends with a newline."""
    lines, last = 0, b"\n"
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def expected_records(dataset: Path, limit: int | None, num_shards: int) -> int | None:
    """About how many records one shard will rewrite, read cheaply (JSONL lines, Parquet
    footers); None when the dataset's files say nothing quickly."""
    files = sorted(p for p in dataset.rglob("*") if p.is_file()) if dataset.is_dir() else [dataset]
    total = 0
    for f in files:
        if f.name.startswith((".", "_")):  # manifests, rejects, markers: not records
            continue
        if f.suffix in {".jsonl", ".json"}:
            total += _line_count(f)
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(f).metadata.num_rows
        else:
            return None
    if limit is not None:
        total = min(total, limit)
    return -(-total // num_shards)


def run(
    config: Config, inputs: Mapping[str, Path], outputs: Mapping[str, Path]
) -> dict[str, float]:
    """Rewrite this shard of ``dataset`` into ``candidates`` (JSONL, one line per record)."""
    dataset = Path(inputs["dataset"])
    adapter = Path(inputs["adapter"]) if inputs.get("adapter") is not None else None
    out_dir = Path(outputs["candidates"])
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(config, dataset, adapter)
    state = _open_state(config, out_dir, fp, adapter)
    spec = DatasetSpec(source=str(dataset), fields=config.fields, limit=config.limit)
    counts = Counts()
    rewriter = Rewriter(config, adapter, work=_candidates_left(config, dataset, state))
    tally = Tally()
    bar = Progress("rewrite", "rec", enabled=config.progress)
    try:
        rejected = _write_shard(config, spec, counts, state, rewriter, tally, bar, out_dir)
        # State only survives a crash; once the shard is complete it would just duplicate the
        # candidates.
        state.discard()
    finally:
        bar.close()
        backend = rewriter.backend
        rewriter.close()
    metrics = _shard_metrics(config, tally, rejected)
    summary = {
        "stage": NAME,
        "rewriter": "pi0+adapter" if adapter is not None else "pi0 (prompt-only baseline)",
        "state": state.prefix,
        "fingerprint": fp,
        "source": counts.source,
        "fields": counts.fields,
        "rejects_by_kind": dict(counts.rejected),
        "backend": backend,
        "metrics": metrics,
    }
    write_text_atomic(
        out_dir / f"summary-{config.shard_index:05d}-of-{config.num_shards:05d}.json",
        json.dumps(summary, indent=2, sort_keys=True) + "\n",
    )
    log.info(
        "rewrite: %d records (%d rejected), %d candidates, answer acceptance %.1f%%, %.1f tok/s",
        tally.records,
        rejected,
        tally.candidates,
        100 * metrics["answer_acceptance"],
        metrics["tokens_per_s"],
    )
    return metrics


def _open_state(config: Config, out_dir: Path, fp: str, adapter: Path | None) -> RewriteState:
    """This shard's resume state (the batches a killed run finished), announced in the log."""
    state = RewriteState.open(config.state_uri, out_dir, fp, config.shard_index, config.num_shards)
    log.info(
        "rewrite: shard %d/%d, rewriter %s, state %s (%d finished batches)",
        config.shard_index,
        config.num_shards,
        "pi0 + adapter" if adapter is not None else "pi0 prompt-only",
        state.prefix,
        len(state.done),
    )
    return state


def _candidates_left(config: Config, dataset: Path, state: RewriteState) -> int | None:
    """About how many candidates remain to generate (the finished batches left out), for the
    generator's sizing; None when the dataset's size is not cheap to read."""
    todo = expected_records(dataset, config.limit, config.num_shards)
    if todo is not None:
        todo = max(todo - len(state.done) * config.batch_records, 0) * config.candidates_per_record
    return todo


def _write_shard(
    config: Config,
    spec: DatasetSpec,
    counts: Counts,
    state: RewriteState,
    rewriter: Rewriter,
    tally: Tally,
    bar: Progress,
    out_dir: Path,
) -> int:
    """Stream the shard's batches into its candidates file (each batch taken from the resume
    state when finished before, else generated and saved there); returns the rejected count."""
    final = out_dir / shard_file_name(config.shard_index, config.num_shards)
    with (
        atomic_path(final) as tmp,
        RejectSink(out_dir / "rejects.jsonl") as sink,
        tmp.open("w", encoding="utf-8") as fh,
    ):
        records = iter_records(spec, sink, counts)
        batches = iter_batches(
            records,
            config.batch_records,
            config.shard_index,
            config.num_shards,
            config.shard_by,
        )
        for b, batch in enumerate(batches):
            rows = state.load(b, [r.id for r in batch])
            generated = rows is None
            if rows is None:
                t0 = time.time()
                rows = rewriter.rewrite(batch, config.shard_index, b)
                tally.generate_seconds += time.time() - t0
                state.save(b, rows)
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            tally.add(rows, generated)
            bar.update(len(rows), **tally.postfix())
        rejected = sink.total
    return rejected


def _shard_metrics(config: Config, tally: Tally, rejected: int) -> dict[str, float]:
    """The shard's figures, from the tally of its batches."""
    elapsed = max(time.time() - tally.started, 1e-9)
    return {
        "records": float(tally.records),
        "rejected": float(rejected),
        "candidates": float(tally.candidates),
        "answer_acceptance": tally.accepted / max(tally.records, 1),
        "candidate_pass_rate": tally.candidates_ok / max(tally.candidates, 1),
        "retries": float(tally.retries),
        "generated_tokens": float(tally.tokens),
        "tokens_per_s": tally.tokens / max(tally.generate_seconds, 1e-9),
        "records_per_s": tally.records / elapsed,
        "batches": float(tally.batches),
        "batches_resumed": float(tally.batches_resumed),
        "shard_index": float(config.shard_index),
        "num_shards": float(config.num_shards),
    }


if __name__ == "__main__":
    from patchgap.stages.base import main

    raise SystemExit(main(sys.modules[__name__]))
