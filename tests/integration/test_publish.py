"""Publishing an output against a real SeaweedFS: two writers to one prefix, a writer killed
between objects and then retried, a reader while the output is replaced, and stale objects.

The switch is the conditional write of ``_manifest.json``; these tests check what readers see
around it (see docs/failure.md, "Publishing an output").
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fixtures.s3 import S3Server

from patchgap.data.ledger import find_datasets
from patchgap.data.sources import DatasetSpec
from patchgap.data.stream import load_records
from patchgap.storage.store import (
    ATTEMPTS_DIR,
    MANIFEST_NAME,
    Manifest,
    ManifestEntry,
    PublishConflict,
    Store,
    fetch_to_local,
    sha256_file,
)

pytestmark = pytest.mark.integration

RECORDS = Path(__file__).resolve().parents[1] / "assets" / "records"
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def store(s3_server: S3Server) -> Store:
    return s3_server.store


def _tree(root: Path, tag: str, files: int = 4) -> Path:
    """An output folder whose every file says which writer made it."""
    (root / "shards").mkdir(parents=True)
    for i in range(files):
        (root / "shards" / f"{i}.jsonl").write_text(f'{{"writer": "{tag}", "i": {i}}}\n' * (i + 1))
    (root / "metrics.json").write_text(f'{{"writer": "{tag}"}}')
    return root


def _same_files(got: Path, want: Path) -> bool:
    names = sorted(p.relative_to(want).as_posix() for p in want.rglob("*") if p.is_file())
    have = sorted(
        p.relative_to(got).as_posix()
        for p in got.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    )
    return names == have and all((got / n).read_bytes() == (want / n).read_bytes() for n in names)


def _attempts(store: Store, prefix: str) -> set[str]:
    return {o.key.split("/", 1)[0] for o in store.list(f"{prefix}/{ATTEMPTS_DIR}")}


class _HeldStore(Store):
    """A store whose first object upload waits until ``go`` is set: the test decides when this
    writer, which has already read the manifest it will replace, gets to upload and switch."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.reached, self.go = threading.Event(), threading.Event()

    def put_file(self, local: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
        self.reached.set()
        assert self.go.wait(60)
        super().put_file(local, uri)


def _race(store: Store, prefix: str, first: Path, second: Path) -> BaseException | None:
    """``first`` reads the manifest and starts; ``second`` publishes whole meanwhile; then
    ``first`` finishes. Returns what ``first`` raised."""
    held = _HeldStore(store.settings)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            held.upload_dir(first, prefix)
        except BaseException as err:  # handed to the test thread
            raised.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    assert held.reached.wait(60)
    store.upload_dir(second, prefix)
    held.go.set()
    thread.join(60)
    return raised[0] if raised else None


@pytest.mark.parametrize("existing", [False, True], ids=["first-publish", "replace"])
def test_of_two_overlapping_writers_the_first_to_switch_wins(
    store: Store, s3_bucket: str, tmp_path: Path, existing: bool
) -> None:
    prefix = f"s3://{s3_bucket}/runs/r1/candidates"
    if existing:
        store.upload_dir(_tree(tmp_path / "old", "old"), prefix)
    slow, fast = _tree(tmp_path / "slow", "slow"), _tree(tmp_path / "fast", "fast")
    err = _race(store, prefix, slow, fast)

    assert isinstance(err, PublishConflict)
    assert "another writer published this output" in str(err) and "\n" not in str(err)
    got = store.download_dir(prefix, tmp_path / "got")
    assert _same_files(tmp_path / "got", fast)
    # One attempt left: the loser removed its objects, the winner the output it replaced.
    assert _attempts(store, prefix) == {got.attempt}
    assert got.generation == (2 if existing else 1)


def test_a_writer_that_starts_after_a_switch_replaces_the_output(
    store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/out"
    first = store.upload_dir(_tree(tmp_path / "a", "a"), prefix)
    second = store.upload_dir(_tree(tmp_path / "b", "b"), prefix)
    assert (first.generation, second.generation) == (1, 2)
    assert _attempts(store, prefix) == {second.attempt}
    store.download_dir(prefix, tmp_path / "got")
    assert _same_files(tmp_path / "got", tmp_path / "b")


_KILLED_UPLOAD = """
import dataclasses, os, signal, sys
from patchgap.storage.store import S3Settings, Store

class Dies(Store):
    puts = 0
    def put_file(self, local, uri):
        if self.puts == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # between two objects, nothing cleaned up
        self.puts += 1
        super().put_file(local, uri)

# One object at a time, so the kill comes after exactly argv[3] of them.
store = Dies(dataclasses.replace(S3Settings.from_env(), max_concurrency=1))
store.upload_dir(sys.argv[1], sys.argv[2])
"""


def test_a_retry_after_a_kill_between_objects_never_shows_a_mix(
    store: Store, s3_bucket: str, s3_server: S3Server, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/runs/r2/scored"
    old = _tree(tmp_path / "old", "old")
    new = _tree(tmp_path / "new", "new")
    store.upload_dir(old, prefix)
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(SRC)}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_UPLOAD, str(new), prefix, "2"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert len(_attempts(store, prefix)) == 2  # the killed attempt's first objects are there

    # Readers still see the old output, whole.
    store.download_dir(prefix, tmp_path / "before")
    assert _same_files(tmp_path / "before", old)

    retried = store.upload_dir(new, prefix)
    store.download_dir(prefix, tmp_path / "after")
    assert _same_files(tmp_path / "after", new)
    # The switch removed the old output and the killed attempt alike.
    assert _attempts(store, prefix) == {retried.attempt}


class _ReplacedDuringRead(Store):
    """A reader whose first object download comes just after another writer replaced the
    output (and removed the objects of the one this reader's manifest names)."""

    def __init__(self, settings: Any, replace: Any) -> None:
        super().__init__(settings)
        self.replace = replace

    def get_file(self, uri: str | os.PathLike[str], local: str | os.PathLike[str]) -> Path:
        if self.replace is not None:
            replace, self.replace = self.replace, None
            replace()
        return super().get_file(uri, local)


def test_a_reader_during_a_replacement_gets_the_new_output_whole(
    store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/ds"
    store.upload_dir(_tree(tmp_path / "a", "a"), prefix)
    new = _tree(tmp_path / "b", "b")
    reader = _ReplacedDuringRead(store.settings, lambda: store.upload_dir(new, prefix))
    got = reader.download_dir(prefix, tmp_path / "got")
    assert got.generation == 2
    assert _same_files(tmp_path / "got", new)


def _legacy_output(store: Store, prefix: str, files: dict[str, bytes]) -> None:
    """An output as earlier versions published it: objects at their keys, format-1 manifest."""
    for key, data in files.items():
        store.put_bytes(data, f"{prefix}/{key}")
    entries = {k: ManifestEntry(hashlib.sha256(d).hexdigest(), len(d)) for k, d in files.items()}
    store.put_bytes(Manifest(files=entries).to_json().encode(), f"{prefix}/{MANIFEST_NAME}")


def test_stale_objects_under_a_prefix_are_never_read(
    store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/inbox/staged"
    records = (RECORDS / "gsm8k_mini.jsonl").read_bytes()
    _legacy_output(store, prefix, {"records.jsonl": records, "rejects.jsonl": b'{"bad": 1}\n'})
    cache = tmp_path / "cache"
    first = fetch_to_local(prefix, cache, store)
    assert (first / "rejects.jsonl").is_file()  # the old output had rejects

    new = tmp_path / "new"
    new.mkdir()
    (new / "records.jsonl").write_bytes(records)
    store.upload_dir(new, prefix)
    store.put_bytes(b'{"stray": 1}\n', f"{prefix}/stray.jsonl")  # written by some other tool

    # The replaced output's objects are gone; a stray object stays but no reader takes it.
    keys = {o.key for o in store.list(prefix)}
    assert "rejects.jsonl" not in keys and "records.jsonl" not in keys and "stray.jsonl" in keys
    again = fetch_to_local(prefix, cache, store)
    assert sorted(p.name for p in again.iterdir()) == [MANIFEST_NAME, "records.jsonl"]
    assert [o.key for o in store.list_published(prefix)] == [MANIFEST_NAME, "records.jsonl"]
    found = find_datasets(store, f"s3://{s3_bucket}/inbox/")
    assert [o.sha256 for o in found] == [sha256_file(new / "records.jsonl")]


def test_a_folder_inside_an_output_is_read_through_its_manifest(
    store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    run = f"s3://{s3_bucket}/runs/r3/artifacts"
    tree = _tree(tmp_path / "art", "art")
    store.upload_dir(tree, run)
    got = fetch_to_local(f"{run}/shards", tmp_path / "in", store, external=True)
    assert _same_files(got, tree / "shards")


def _stage(src: Path, dest: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "patchgap.cli.main", "data", "stage", str(src), dest],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_data_stage_runs_leave_one_readable_output(
    store: Store, s3_bucket: str, s3_server: S3Server, tmp_path: Path
) -> None:
    dest = f"s3://{s3_bucket}/datasets/mini"
    sources = []
    for i in range(2):
        lines = (RECORDS / "gsm8k_mini.jsonl").read_text().splitlines()[: 2 + i]
        path = tmp_path / f"src{i}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        sources.append(path)
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(SRC)}
    procs = [_stage(src, dest, env) for src in sources]
    results = [(p.wait(180), *p.communicate()) for p in procs]

    codes = sorted(code for code, _, _ in results)
    # Overlapping runs: one wins (0), the other names the conflict in one line (2); runs that
    # happened not to overlap both succeed, the later one's output standing.
    assert codes in ([0, 0], [0, 2]), results
    for code, _, err in results:
        if code == 2:
            assert "another writer published this output" in err and err.count("\n") == 1
    manifest = store.read_manifest(dest)
    assert manifest is not None and manifest.metadata["staged"] in (2, 3)
    got = fetch_to_local(f"{dest}/records.jsonl", tmp_path / "in", store)
    assert len(got.read_text().splitlines()) == manifest.metadata["staged"]
    assert _attempts(store, dest) == {manifest.attempt}


def test_a_local_folder_is_published_whole_by_the_last_writer(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    store = Store()
    store.upload_dir(_tree(tmp_path / "a", "a", files=6), dest)
    b = _tree(tmp_path / "b", "b", files=2)
    threads = [
        threading.Thread(target=store.upload_dir, args=(src, dest))
        for src in (_tree(tmp_path / "c", "c", files=5), b)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    manifest = store.read_manifest(dest)
    assert manifest is not None
    writer = "b" if len(manifest.files) == 3 else "c"
    # Files only an older output listed are gone, so a reader of the folder sees one output.
    assert _same_files(dest, tmp_path / writer)


def test_the_run_report_reads_only_the_current_artifacts(
    store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    from patchgap.reports import results

    run = f"s3://{s3_bucket}/runs/run-9"

    def artifacts(tag: str, rate: float) -> Path:
        root = tmp_path / tag
        (root / "gate" / "report").mkdir(parents=True)
        (root / "gate" / "report" / "gate_metrics.json").write_text(
            f'{{"acceptance_rate": {rate}}}'
        )
        (root / "evaluate" / "report").mkdir(parents=True)
        (root / "evaluate" / "report" / "results.json").write_text(f'{{"writer": "{tag}"}}')
        return root

    store.upload_dir(artifacts("old", 0.1), f"{run}/artifacts")
    # A republish killed after its objects: an attempt no manifest names stays behind.
    stale = f"{run}/artifacts/{ATTEMPTS_DIR}/9-00000000000000aa/gate/report/gate_metrics.json"
    store.put_bytes(b'{"acceptance_rate": 0.9}', stale)
    store.put_bytes(b'{"run_id": "run-9"}', f"{run}/run.json")

    objects = store.list_published(run)
    found = results.collect(store, run, {o.key: o.uri for o in objects})
    assert found.run_id == "run-9" and found.evaluation == {"writer": "old"}
    assert found.gates == {results.RL: {"acceptance_rate": 0.1}}
    assert "artifacts/gate/report/gate_metrics.json" in {o.key for o in objects}
    assert stale not in {o.uri for o in objects}


def test_a_staged_folder_with_rejects_reads_back_as_its_records_alone(
    store: Store, s3_bucket: str, s3_server: S3Server, tmp_path: Path
) -> None:
    src = tmp_path / "src.jsonl"
    good = (RECORDS / "gsm8k_mini.jsonl").read_text().splitlines()[:2]
    src.write_text("\n".join([*good, '{"question": "no answer"}']) + "\n")
    dest = f"s3://{s3_bucket}/datasets/with-rejects"
    env = {**os.environ, **s3_server.env, "PYTHONPATH": str(SRC)}
    proc = _stage(src, dest, env)
    code, _, err = proc.wait(180), *proc.communicate()
    assert code == 0, err
    manifest = store.read_manifest(dest)
    assert manifest is not None and "_rejects.jsonl" in manifest.files
    folder = fetch_to_local(dest, tmp_path / "in", store)
    # The rejects file is bookkeeping ("_"): the folder reads as the two valid records only.
    result = load_records(DatasetSpec(source=str(folder)), tmp_path / "again.rejects.jsonl")
    assert len(result.records) == 2 and result.counts.rejected_total == 0


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_publish_leaves_out_what_exclude_picks(
    store: Store, s3_bucket: str, tmp_path: Path, where: str
) -> None:
    """``run.publish_weights: false``: weights stay local; the manifest lists the rest only."""
    from patchgap.run.execute import _is_weights, left_out

    src = _tree(tmp_path / "out", "w")
    (src / "model").mkdir()
    (src / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    (src / "model" / "config.json").write_text("{}")
    prefix = f"s3://{s3_bucket}/left-out" if where == "s3" else str(tmp_path / "published")
    manifest = store.upload_dir(src, prefix, exclude=_is_weights)
    assert "model/config.json" in manifest.files
    assert not any(k.endswith(".safetensors") for k in manifest.files)
    got = fetch_to_local(prefix, tmp_path / "got")
    assert (got / "model" / "config.json").is_file()
    assert not (got / "model" / "model.safetensors").exists()
    assert left_out(src, _is_weights) == {
        "files": 1,
        "bytes": 4096,
        "why": "run.publish_weights: false (model weights stay in the local work folder)",
        "local": str(src),
    }
