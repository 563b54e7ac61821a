"""The ``watch`` pipeline end to end: ``patchgap run`` (the real command, in its own process)
under kfp.local with a tiny random model on the real embedded S3. Datasets dropped under a
prefix are each staged, rewritten, gated and recorded in the ledger once; a later run takes only
what is new; a run killed midway leaves claims that block the next run until they expire, and
then a run takes them up, with every dataset recorded exactly once."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

PATCHGAP = Path(sys.executable).parent / "patchgap"


def _records(name: str, start: int, n: int) -> bytes:
    """``n`` GSM8K-style records; ``start`` makes each dataset's bytes its own."""
    lines = []
    for i in range(start, start + n):
        a, b = i + 2, i + 5
        lines.append(
            json.dumps(
                {
                    "question": f"{name}: Sam has {a} boxes of {b} pens. How many pens?",
                    "answer": f"He has {a} * {b} = <<{a}*{b}={a * b}>>{a * b} pens.\n#### {a * b}",
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


def _config(tmp: Path, model: Path, bucket: str, *, claim_hours: float, adapter: str | None):
    run = {
        "pipeline": "watch",
        "bucket": bucket,
        "prefix": f"s3://{bucket}/incoming/",
        "ledger_uri": f"s3://{bucket}/ledger/watch",
        "max_datasets": 8,
        "claim_hours": claim_hours,
        "dataset_fields": "gsm8k",
    }
    if adapter is not None:
        run["adapter_uri"] = adapter
    cfg = {
        "model": str(model),
        "seed": 0,
        "run": run,
        "rewrite": {"generation": {"max_new_tokens": 8, "batch_size": 4}, "batch_records": 4},
        "gate": {"batch_records": 4},
    }
    path = tmp / "watch.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _env(home: Path) -> dict[str, str]:
    # The fixture's AWS_* settings point the run at the test's S3 (no embedded server started).
    return {**os.environ, "PATCHGAP_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def _run(cfg: Path, home: Path) -> str:
    """``patchgap run --config cfg``; its run id (the last line is the run's JSON)."""
    done = subprocess.run(
        [str(PATCHGAP), "run", "--config", str(cfg)],
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["run_id"]


def _published(store, bucket: str, run_id: str) -> dict:
    """The run manifest where `patchgap artifacts` looks: s3://<bucket>/runs/<id>/run.json."""
    run = json.loads(store.get_bytes(f"s3://{bucket}/runs/{run_id}/run.json"))
    assert run["status"] == "succeeded" and run["pipeline"] == "watch"
    return run


def _ledger(store, bucket: str) -> dict[str, dict]:
    """The ledger entries by sha256 (claims and the hash cache left out)."""
    prefix = f"s3://{bucket}/ledger/watch/"
    out = {}
    for info in store.list(prefix):
        rel = info.uri.removeprefix(prefix)
        if "/" not in rel and rel != "hashes.json":
            out[rel.removesuffix(".json")] = json.loads(store.get_bytes(info.uri))
    return out


def _claims(store, bucket: str) -> list[dict]:
    return [
        json.loads(store.get_bytes(i.uri))
        for i in store.list(f"s3://{bucket}/ledger/watch/claims/")
    ]


def _check_processed(store, bucket: str, run_id: str, run: dict, names: list[str]) -> None:
    """Each of ``names`` was staged, rewritten and gated by this run, its D_R is among the
    published artifacts, and its ledger entry names this run."""
    watch = run["watch"]
    uris = [f"s3://{bucket}/incoming/{n}" for n in names]
    assert watch["claimed"] == uris
    assert sorted(row["uri"] for row in watch["datasets"]) == uris
    art = store.read_manifest(f"s3://{bucket}/runs/{run_id}/artifacts")
    assert art is not None
    keys = [str(k) for k in art.files]
    ledger = _ledger(store, bucket)
    for row in watch["datasets"]:
        assert row["records_valid"] == 3 and row["records_rejected"] == 0, row
        assert row["rewritten"] is True and row["stopped_at"] is None, row
        assert 0.0 <= row["acceptance_rate"] <= 1.0, row
        folder = row["work_folder"]
        assert any(k.startswith(f"{folder}/gate") and "/dataset_r/" in k for k in keys), folder
        assert any(k.startswith(f"{folder}/rewrite") and "/candidates/" in k for k in keys)
        entry = ledger[row["sha256"]]
        assert row["ledger_entry"].endswith(f"/ledger/watch/{row['sha256']}.json")
        assert entry["uri"] == row["uri"]
        # The KFP run name (kfp.local adds the loop iteration's folder to it).
        assert entry["pipeline_run"].startswith(watch["pipeline_run"]), entry
        assert entry["acceptance_rate"] == pytest.approx(row["acceptance_rate"])


def test_watch_processes_each_new_dataset_once(
    tmp_path: Path, tiny_llama: Path, s3_server, s3_bucket: str
) -> None:
    from typer.testing import CliRunner

    from patchgap.cli.main import cli
    from patchgap.lm.tiny import save_random_lora

    store = s3_server.store
    adapter = save_random_lora(tiny_llama, tmp_path / "adapter")
    adapter_uri = f"s3://{s3_bucket}/adapters/rewriter"
    store.upload_dir(adapter, adapter_uri)
    cfg = _config(tmp_path, tiny_llama, s3_bucket, claim_hours=1.0, adapter=adapter_uri)
    home = tmp_path / "home"
    data = {"a.jsonl": _records("a", 0, 3), "b.jsonl": _records("b", 10, 3)}
    for name, body in data.items():
        store.put_bytes(body, f"s3://{s3_bucket}/incoming/{name}")

    first = _run(cfg, home)
    run = _published(store, s3_bucket, first)
    assert run["inputs"]["adapter_uri"] == adapter_uri
    _check_processed(store, s3_bucket, first, run, ["a.jsonl", "b.jsonl"])
    ledger = _ledger(store, s3_bucket)
    assert set(ledger) == {hashlib.sha256(b).hexdigest() for b in data.values()}
    assert _claims(store, s3_bucket) == []  # released once recorded
    # `patchgap artifacts ls` finds the run's outputs.
    listed = CliRunner().invoke(cli, ["artifacts", "ls", first, "--bucket", s3_bucket])
    assert listed.exit_code == 0, listed.output
    assert "dataset_r" in listed.output and "run.json" in listed.output

    # A third dataset, and a copy of a.jsonl under another name (same content, so not new).
    third = _records("c", 20, 3)
    store.put_bytes(third, f"s3://{s3_bucket}/incoming/c.jsonl")
    store.put_bytes(data["a.jsonl"], f"s3://{s3_bucket}/incoming/copy-of-a.jsonl")
    second = _run(cfg, home)
    run2 = _published(store, s3_bucket, second)
    _check_processed(store, s3_bucket, second, run2, ["c.jsonl"])
    after = _ledger(store, s3_bucket)
    assert set(after) == set(ledger) | {hashlib.sha256(third).hexdigest()}
    for sha, entry in ledger.items():  # a and b were not processed again
        assert after[sha] == entry


def test_killed_run_leaves_claims_that_expire_and_are_taken_up(
    tmp_path: Path, tiny_llama: Path, s3_server, s3_bucket: str
) -> None:
    store = s3_server.store
    # A claim lasts 25 s here: long enough to see it block the next run (the kill comes a second
    # or two after the claims, the blocked run lists the prefix a few seconds later), short
    # enough to wait for.
    lease = 25.0
    # No adapter: the prompt-only branch of the pipeline.
    cfg = _config(tmp_path, tiny_llama, s3_bucket, claim_hours=lease / 3600, adapter=None)
    home = tmp_path / "home"
    data = {"a.jsonl": _records("a", 0, 3), "b.jsonl": _records("b", 10, 3)}
    for name, body in data.items():
        store.put_bytes(body, f"s3://{s3_bucket}/incoming/{name}")

    # Kill the whole run (the command and the step it runs) once the first dataset is staged,
    # that is while its rewrite runs: claimed, not recorded.
    proc = subprocess.Popen(
        [str(PATCHGAP), "run", "--config", str(cfg)],
        env=_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        pattern = "*/pipeline-root/*/for-loop-*-iteration-0/stage-dataset*/executor_output.json"
        while not list((home / "runs").glob(pattern)):
            assert proc.poll() is None, f"the run ended (status {proc.returncode}) before a kill"
            assert time.time() < deadline, "the run staged no dataset in 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (killed,) = [p.name for p in (home / "runs").iterdir()]
    assert not store.exists(f"s3://{s3_bucket}/runs/{killed}/run.json")  # died unpublished
    claims = _claims(store, s3_bucket)
    assert sorted(c["uri"] for c in claims) == [f"s3://{s3_bucket}/incoming/{n}" for n in data]
    assert _ledger(store, s3_bucket) == {}

    # While the claims live, a run takes nothing.
    expires = max(c["expires"] for c in claims)
    assert expires - time.time() > 10, "the claims expired before the blocked run could start"
    blocked = _run(cfg, home)
    assert _published(store, s3_bucket, blocked)["watch"]["claimed"] == []
    assert _ledger(store, s3_bucket) == {}

    # Once they expire, the next run takes both up and records each once.
    time.sleep(max(0.0, expires - time.time()) + 1)
    takeover = _run(cfg, home)
    run = _published(store, s3_bucket, takeover)
    assert run["inputs"]["adapter_uri"] is None
    _check_processed(store, s3_bucket, takeover, run, ["a.jsonl", "b.jsonl"])
    ledger = _ledger(store, s3_bucket)
    assert set(ledger) == {hashlib.sha256(b).hexdigest() for b in data.values()}
    assert _claims(store, s3_bucket) == []

    # Nothing is left to do: the next run processes nothing and changes no entry.
    idle = _run(cfg, home)
    assert _published(store, s3_bucket, idle)["watch"]["claimed"] == []
    assert _ledger(store, s3_bucket) == ledger


def test_a_dataset_that_fails_is_not_recorded_and_the_others_are(
    tmp_path: Path, tiny_llama: Path, s3_server, s3_bucket: str
) -> None:
    store = s3_server.store
    cfg = _config(tmp_path, tiny_llama, s3_bucket, claim_hours=1.0, adapter=None)
    good = _records("b", 10, 3)
    store.put_bytes(b"this is { not json\n", f"s3://{s3_bucket}/incoming/a-broken.jsonl")
    store.put_bytes(good, f"s3://{s3_bucket}/incoming/b.jsonl")
    done = subprocess.run(
        [str(PATCHGAP), "run", "--config", str(cfg)],
        env=_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: watch run ") and "not every dataset was recorded" in last
    assert "a-broken.jsonl: stopped at stage-dataset, not recorded" in done.stdout
    (run_id,) = [p.name for p in (tmp_path / "home" / "runs").iterdir()]
    run = json.loads(store.get_bytes(f"s3://{s3_bucket}/runs/{run_id}/run.json"))
    assert run["status"] == "failed"
    rows = {row["uri"].rsplit("/", 1)[1]: row for row in run["watch"]["datasets"]}
    assert rows["a-broken.jsonl"]["stopped_at"] == "stage-dataset"
    assert rows["b.jsonl"]["stopped_at"] is None
    # Only the good one is recorded; the broken one keeps its claim until it expires.
    assert set(_ledger(store, s3_bucket)) == {hashlib.sha256(good).hexdigest()}
    assert [c["uri"] for c in _claims(store, s3_bucket)] == [
        f"s3://{s3_bucket}/incoming/a-broken.jsonl"
    ]


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"prefix": None}, "prefix: (missing) must be a folder in the run's bucket"),
        ({"prefix": "s3://elsewhere/incoming/"}, "prefix: s3://elsewhere/incoming/ must be"),
        ({"prefix": "s3://patchgap"}, "prefix: s3://patchgap must be a folder"),
        ({"dataset": {"source": "gsm8k:train"}}, "dataset: not used by the watch pipeline"),
        ({"ledger_uri": "ledger/here"}, "ledger_uri: ledger/here is not an s3:// URI"),
        ({"dataset_fields": "nope"}, "unknown field preset 'nope'"),
        ({"claim_hours": 0}, "claim_hours"),
    ],
)
def test_watch_settings_mistakes_name_the_key(tmp_path: Path, run: dict, message: str) -> None:
    from patchgap.errors import ConfigError
    from patchgap.run.prepare import load_run_settings

    settings = {"pipeline": "watch", "bucket": "patchgap", "prefix": "s3://patchgap/in/", **run}
    settings = {k: v for k, v in settings.items() if v is not None}  # None: the key left out
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "smollm2", "run": settings}))
    with pytest.raises(ConfigError) as err:
        load_run_settings(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_a_missing_adapter_is_one_line_and_exit_2(
    tmp_path: Path, tiny_llama: Path, s3_server, s3_bucket: str
) -> None:
    missing = f"s3://{s3_bucket}/adapters/none"
    cfg = _config(tmp_path, tiny_llama, s3_bucket, claim_hours=1.0, adapter=missing)
    done = subprocess.run(
        [str(PATCHGAP), "run", "--config", str(cfg)],
        env=_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    # The preflight finds it, before any store write or pipeline step.
    assert str(cfg) in line and f"[run.adapter_uri]: {missing} has no _manifest.json" in line, line
    assert "Traceback" not in done.stdout + done.stderr


def test_local_and_cluster_builds_are_one_graph(tmp_path: Path) -> None:
    """What runs here is what a cluster runs: the same tasks, wiring and branches; only the
    placement (resources, retries, Kubernetes settings) and the loop's parallelism differ."""
    from kfp import compiler

    from patchgap.pipelines import watch

    placement = (
        "accelerator_type",
        "accelerator_count",
        "gpu_count",
        "node_selector",
        "tolerations",
    )

    def wiring(inputs: dict) -> dict:
        """A task's inputs less the placement parameters a cluster build passes down."""
        params = {
            k: v for k, v in inputs.get("parameters", {}).items() if not k.endswith(placement)
        }
        return {**inputs, "parameters": params}

    def graph(local: bool) -> dict[str, dict[str, tuple]]:
        path = tmp_path / f"watch-{local}.yaml"
        compiler.Compiler().compile(watch.build(local=local), str(path))
        spec = next(yaml.safe_load_all(path.read_text()))
        dags = {"root": spec["root"]["dag"]}
        dags.update({n: c["dag"] for n, c in spec["components"].items() if "dag" in c})
        return {
            name: {
                task: (
                    body["componentRef"]["name"],
                    tuple(sorted(body.get("dependentTasks", []))),
                    json.dumps(wiring(body.get("inputs", {})), sort_keys=True),
                    json.dumps(body.get("triggerPolicy", {}), sort_keys=True),
                )
                for task, body in dag["tasks"].items()
            }
            for name, dag in dags.items()
        }

    local, cluster = graph(True), graph(False)
    assert local == cluster
    tasks = {t: v for dag in local.values() for t, v in dag.items()}
    # Both rewriters: pi0 + the imported adapter, and pi0 alone (the prompt-only branch).
    assert {"importer", "rewrite", "rewrite-2", "record-processed", "record-processed-2"} <= set(
        tasks
    )
    assert "gate" in tasks["record-processed"][1] and "gate-2" in tasks["record-processed-2"][1]
