"""Stage rewrite on tiny models over a real GSM8K slice: candidates, rejects, shards, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchgap.stages import gate, rewrite

pytestmark = pytest.mark.integration

# A short rewriting prompt keeps the tiny models' context small; the real one is the default.
SHORT_TEMPLATE = "Problem: {question}\nSolution: {solution}\nRewrite it."


@pytest.fixture(scope="module")
def gsm8k_slice(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real GSM8K train records plus two malformed lines, in a temp file (never the repo)."""
    lines = (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:6]
    lines.insert(2, '{"question": "a record without its solution"}')
    lines.insert(5, "{not json")
    path = tmp_path_factory.mktemp("data") / "gsm8k_slice.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from patchgap.lm.tiny import save_random_lora

    return save_random_lora(tiny_llama, tmp_path_factory.mktemp("adapter") / "rewriter")


def _config(model: Path, generation: dict | None = None, **kw: object) -> rewrite.Config:
    base: dict[str, object] = dict(
        model=str(model),
        fields="gsm8k",
        template=SHORT_TEMPLATE,
        generation={"max_new_tokens": 6, "batch_size": 4, **(generation or {})},
        batch_records=2,
        progress=False,
    )
    base.update(kw)
    return rewrite.Config(**base)


def _rows(folder: Path) -> list[dict]:
    rows = []
    for f in sorted(folder.glob("candidates-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return rows


def test_every_valid_record_gets_candidates_and_malformed_ones_are_rejected(
    tiny_llama: Path, gsm8k_slice: Path, tmp_path: Path
) -> None:
    cfg = _config(tiny_llama, generation={"n": 2, "temperature": 1.0}, max_retries=1)
    metrics = rewrite.run(cfg, {"dataset": gsm8k_slice}, {"candidates": tmp_path})
    rows = _rows(tmp_path)
    assert [r["id"] for r in rows] == [f"gsm8k_slice-{i}" for i in (0, 1, 3, 4, 6, 7)]
    for row in rows:
        assert row["answer"] and row["solution"].endswith(row["answer"])
        cands = row["candidates"]
        assert len([c for c in cands if c["trial"] == 0]) == 2
        # Random weights never reach the right answer: each failed sample is retried once.
        assert len(cands) == 4 and {c["trial"] for c in cands} == {0, 1}
        assert all(0 < c["num_tokens"] <= 6 for c in cands)
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects] == [
        (3, "missing_solution"),
        (6, "invalid_json"),
    ]
    assert metrics["rejected"] == 2 and metrics["records"] == 6
    assert metrics["candidates"] == 24 and metrics["tokens_per_s"] > 0
    assert not (tmp_path / "_state").exists()  # the default state is dropped once complete


def test_shards_with_an_adapter_partition_the_records(
    tiny_llama: Path, lora_adapter: Path, gsm8k_slice: Path, tmp_path: Path
) -> None:
    ids = []
    for shard in (0, 1):
        cfg = _config(tiny_llama, shard_index=shard, num_shards=2, shard_by="hash")
        inputs = {"dataset": gsm8k_slice, "adapter": lora_adapter}
        rewrite.run(cfg, inputs, {"candidates": tmp_path})
        ids.append([r["id"] for r in _rows(tmp_path) if r["id"] not in sum(ids, [])])
    assert sorted(ids[0] + ids[1]) == sorted(f"gsm8k_slice-{i}" for i in (0, 1, 3, 4, 6, 7))
    assert not set(ids[0]) & set(ids[1])
    summary = json.loads((tmp_path / "summary-00001-of-00002.json").read_text())
    assert summary["rewriter"] == "pi0+adapter"


def test_a_crash_then_restart_gives_the_same_candidates_and_d_r(
    tiny_llama: Path,
    gsm8k_slice: Path,
    tmp_path: Path,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Greedy decoding: an uninterrupted run and a crashed-then-resumed one (state in S3) agree."""
    clean = tmp_path / "clean"
    rewrite.run(_config(tiny_llama), {"dataset": gsm8k_slice}, {"candidates": clean})

    state = f"s3://{s3_bucket}/rewrite-state"
    cfg = _config(tiny_llama, state_uri=state)
    resumed = tmp_path / "resumed"
    real = rewrite.Rewriter.rewrite
    calls = {"n": 0}

    def crash_on_second_batch(self: rewrite.Rewriter, *args: object) -> list[dict]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated preemption")
        return real(self, *args)

    monkeypatch.setattr(rewrite.Rewriter, "rewrite", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="preemption"):
        rewrite.run(cfg, {"dataset": gsm8k_slice}, {"candidates": resumed})
    assert not list(resumed.glob("candidates-*.jsonl"))
    monkeypatch.setattr(rewrite.Rewriter, "rewrite", real)

    metrics = rewrite.run(cfg, {"dataset": gsm8k_slice}, {"candidates": resumed})
    assert metrics["batches_resumed"] == 1 and metrics["batches"] == 3
    assert _rows(resumed) == _rows(clean)
    from patchgap.storage.store import Store

    assert Store.from_env().list(state) == []  # pruned once the shard is complete

    gcfg = gate.Config(
        model=str(tiny_llama), fields="gsm8k", reward={"judge": False}, write_parquet=False
    )
    outs = {}
    for name, cands in (("clean", clean), ("resumed", resumed)):
        outs[name] = tmp_path / f"dr-{name}"
        gate.run(
            gcfg,
            {"dataset": gsm8k_slice, "candidates": cands},
            {"dataset_r": outs[name], "report": tmp_path / f"report-{name}"},
        )
    a = (outs["clean"] / gate.D_R_FILE).read_text().splitlines()
    b = (outs["resumed"] / gate.D_R_FILE).read_text().splitlines()
    assert a == b
    ids = [json.loads(x)["id"] for x in a]
    assert len(ids) == len(set(ids)) == 6


def test_a_stage_killed_before_its_output_manifest_keeps_its_state_and_resumes(
    tiny_llama: Path, gsm8k_slice: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state beside an s3:// output goes only once the output's manifest is written: a stage
    that dies while its output is uploaded resumes every batch instead of generating it again."""
    from patchgap.stages.base import execute
    from patchgap.storage.store import MANIFEST_NAME, Store

    out = f"s3://{s3_bucket}/candidates"
    real_put = Store.put_bytes_if

    def dies_at_the_manifest(self: Store, data: bytes, uri: str, etag: str | None) -> bool:
        if str(uri) == f"{out}/{MANIFEST_NAME}":
            raise RuntimeError("killed before the output's manifest")
        return real_put(self, data, uri, etag)

    monkeypatch.setattr(Store, "put_bytes_if", dies_at_the_manifest)
    with pytest.raises(RuntimeError, match="killed"):
        execute(rewrite, _config(tiny_llama), {"dataset": str(gsm8k_slice)}, {"candidates": out})
    store = Store.from_env()
    # Not complete; the failed upload removed its own objects (a SIGKILL would leave them,
    # under an attempt no manifest names).
    assert store.read_manifest(out) is None and store.list(out) == []
    assert len(store.list(f"{out}.state")) == 3  # every finished batch is still kept
    monkeypatch.setattr(Store, "put_bytes_if", real_put)

    again = execute(
        rewrite, _config(tiny_llama), {"dataset": str(gsm8k_slice)}, {"candidates": out}
    )
    assert again.metrics["batches"] == 3 and again.metrics["batches_resumed"] == 3
    assert store.read_manifest(out) is not None
    assert store.list(f"{out}.state") == []  # removed once the output is complete


def test_a_corrupt_state_batch_is_regenerated_not_fatal(tmp_path: Path) -> None:
    state = rewrite.RewriteState(str(tmp_path / "state"), "fp", 0, 1)
    rows = [{"id": "a", "candidates": []}, {"id": "b", "candidates": []}]
    state.save(0, rows)
    state.save(1, rows)
    state = rewrite.RewriteState(str(tmp_path / "state"), "fp", 0, 1)
    assert state.load(0, ["a", "b"]) == rows
    # Truncated JSON, bytes that are not UTF-8, a line that is not an object: each is redone.
    for blob in (b'{"id": "a", "cand', b"\xff\xfe", b"[1, 2]\n"):
        state.store.put_bytes(blob, state.uri(1))
        assert state.load(1, ["a", "b"]) is None
    state.clear()
    assert state.store.list(state.prefix) == []


def test_best_of_n_gives_the_greedy_rewrite_plus_n_samples(
    tiny_llama: Path, gsm8k_slice: Path, tmp_path: Path
) -> None:
    greedy_dir, best_dir = tmp_path / "greedy", tmp_path / "best"
    rewrite.run(_config(tiny_llama), {"dataset": gsm8k_slice}, {"candidates": greedy_dir})
    cfg = _config(tiny_llama, generation={"n": 3, "temperature": 1.0}, include_greedy=True)
    assert cfg.candidates_per_record == 4
    metrics = rewrite.run(cfg, {"dataset": gsm8k_slice}, {"candidates": best_dir})
    assert metrics["candidates"] == 6 * 4
    for one, best in zip(_rows(greedy_dir), _rows(best_dir), strict=True):
        cands = best["candidates"]
        assert [c["sampling"] for c in cands] == ["greedy", "sample", "sample", "sample"]
        assert [c["index"] for c in cands] == [0, 1, 2, 3]
        # Candidate 0 is exactly what a greedy-only run generates.
        assert cands[0]["text"] == one["candidates"][0]["text"]
        assert one["candidates"][0]["sampling"] == "greedy"
    with pytest.raises(ValueError, match="include_greedy"):
        _config(tiny_llama, include_greedy=True)  # temperature 0: every candidate is greedy


def test_include_greedy_off_keeps_the_resume_fingerprint(gsm8k_slice: Path) -> None:
    """Batches finished before the setting existed are still picked up when it is off."""
    a = rewrite.fingerprint(_config(Path("m")), gsm8k_slice, None)
    b = rewrite.fingerprint(
        _config(Path("m"), generation={"n": 2, "temperature": 1.0}), gsm8k_slice, None
    )
    c = rewrite.fingerprint(
        _config(Path("m"), generation={"n": 2, "temperature": 1.0}, include_greedy=True),
        gsm8k_slice,
        None,
    )
    assert len({a, b, c}) == 3
    settings = _config(Path("m")).model_dump(mode="json")
    assert settings["include_greedy"] is False  # present in the config, absent from the hash
