"""The store against a real SeaweedFS: objects, multipart, manifests, verification, errors, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
from fixtures.s3 import S3Server
from typer.testing import CliRunner

from patchgap.errors import ChecksumError, StoreError
from patchgap.storage.store import MANIFEST_NAME, S3Settings, Store, fetch_to_local, sha256_file

pytestmark = pytest.mark.integration

RECORDS = Path(__file__).resolve().parents[1] / "assets" / "records"


@pytest.fixture
def store(s3_server: S3Server) -> Store:
    return s3_server.store


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "out"
    (src / "shards").mkdir(parents=True)
    for i in range(3):
        (src / "shards" / f"{i}.jsonl").write_text(f'{{"i": {i}}}\n' * (i + 1))
    (src / "metrics.json").write_text('{"acc": 0.5}')
    return src


def test_server_started_quickly(s3_server: S3Server) -> None:
    print(f"SeaweedFS ready in {s3_server.startup_seconds:.2f}s at {s3_server.endpoint}")
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint


def test_put_get_list_exists_delete(store: Store, s3_bucket: str, tmp_path: Path) -> None:
    base = f"s3://{s3_bucket}/data"
    store.put_bytes(b"hello", f"{base}/a.txt")
    src = tmp_path / "b.bin"
    src.write_bytes(b"\x00\x01" * 500)
    store.put_file(src, f"{base}/sub/b.bin")
    store.put_bytes(b"other", f"s3://{s3_bucket}/database.txt")  # same raw prefix, other folder

    assert store.get_bytes(f"{base}/a.txt") == b"hello"
    assert store.get_file(f"{base}/sub/b.bin", tmp_path / "dl" / "b.bin").read_bytes() == (
        src.read_bytes()
    )
    assert store.exists(f"{base}/a.txt") and not store.exists(f"{base}/nope.txt")
    listed = store.list(base)
    assert [(o.key, o.size) for o in listed] == [("a.txt", 5), ("sub/b.bin", 1000)]
    assert listed[1].uri == f"{base}/sub/b.bin"

    store.delete(f"{base}/a.txt")
    assert not store.exists(f"{base}/a.txt")
    assert store.delete_prefix(base) == 1 and store.list(base) == []


def test_multipart_upload_of_64_mb_round_trips(
    store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    size = 64 * 1024 * 1024 + 12345
    big = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with big.open("wb") as fh:
        for _ in range(size // (4 * 1024 * 1024)):
            block = os.urandom(4 * 1024 * 1024)
            digest.update(block)
            fh.write(block)
        tail = os.urandom(size % (4 * 1024 * 1024))
        digest.update(tail)
        fh.write(tail)
    chunk = 8 * 1024 * 1024
    mp = Store(
        dataclasses.replace(store.settings, multipart_threshold=chunk, multipart_chunksize=chunk)
    )
    uri = f"s3://{s3_bucket}/big/big.bin"
    mp.put_file(big, uri)

    head = mp.client.head_object(Bucket=s3_bucket, Key="big/big.bin")
    assert head["ContentLength"] == size
    # A multipart object's ETag ends in "-<parts>": 64 MB in 8 MiB parts is 9 parts.
    assert head["ETag"].strip('"').endswith("-9")

    back = mp.get_file(uri, tmp_path / "back.bin")
    assert sha256_file(back) == digest.hexdigest()


def test_dir_round_trip_and_metadata(
    store: Store, s3_bucket: str, tree: Path, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/runs/r1/rewrite"
    meta = {"config": {"lr": 1e-5}, "inputs": {"train": "ab" * 32}, "versions": {"p": "0.1"}}
    written = store.upload_dir(tree, prefix, meta)
    # The bytes lie under the upload's attempt; readers know them by the manifest's keys.
    keys = [o.key for o in store.list(prefix)]
    assert keys == sorted([*(written.location(k) for k in written.files), MANIFEST_NAME])
    assert all(k.startswith(f"_attempts/{written.attempt}/") for k in keys[:-1])
    published = [o.key for o in store.list_published(prefix)]
    assert published == sorted([*written.files, MANIFEST_NAME])

    read = store.read_manifest(prefix + "/")
    assert read is not None and read.metadata == meta and read.files == written.files

    out = tmp_path / "dl"
    store.download_dir(prefix, out)
    for key in written.files:
        assert (out / key).read_bytes() == (tree / key).read_bytes()


def test_tampered_object_is_detected_on_download(
    store: Store, s3_bucket: str, tree: Path, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/out"
    where = store.upload_dir(tree, prefix).location("shards/1.jsonl")
    store.put_bytes(b'{"i": 999}\n', f"{prefix}/{where}")  # after the manifest
    with pytest.raises(ChecksumError, match=rf"{prefix}/shards/1\.jsonl: checksum mismatch"):
        store.download_dir(prefix, tmp_path / "dl")
    assert not (tmp_path / "dl" / "shards" / "1.jsonl").exists()


def test_missing_manifest_means_not_complete(
    store: Store, s3_bucket: str, tree: Path, tmp_path: Path
) -> None:
    prefix = f"s3://{s3_bucket}/half"
    store.put_file(tree / "metrics.json", f"{prefix}/metrics.json")  # data, no manifest
    assert store.read_manifest(prefix) is None
    with pytest.raises(StoreError, match="not complete"):
        store.download_dir(prefix, tmp_path / "dl")


def test_escaping_key_in_bucket_is_refused(store: Store, s3_bucket: str, tmp_path: Path) -> None:
    prefix = f"s3://{s3_bucket}/evil"
    manifest = (
        '{"format": 1, "files": {"../../../outside.txt": '
        '{"sha256": "' + "0" * 64 + '", "size": 1}}, "metadata": {}}'
    )
    store.put_bytes(manifest.encode(), f"{prefix}/{MANIFEST_NAME}")
    with pytest.raises(StoreError, match="escape the target folder"):
        store.download_dir(prefix, tmp_path / "a" / "b")
    assert not (tmp_path / "outside.txt").exists()


def test_errors_name_the_uri(store: Store, s3_bucket: str, s3_server: S3Server) -> None:
    with pytest.raises(StoreError, match=rf"s3://{s3_bucket}/nope\.txt: no such object"):
        store.get_bytes(f"s3://{s3_bucket}/nope.txt")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-xyz' does not exist"):
        store.get_file("s3://no-such-bucket-xyz/a.txt", "/tmp/never-written")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-xyz' does not exist"):
        store.list("s3://no-such-bucket-xyz/runs/")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-xyz' does not exist"):
        store.exists("s3://no-such-bucket-xyz/a.txt")
    wrong = Store(
        dataclasses.replace(store.settings, secret_access_key="wrong-secret", max_attempts=1)
    )
    with pytest.raises(StoreError, match=rf"s3://{s3_bucket}/a\.txt: access denied"):
        wrong.get_bytes(f"s3://{s3_bucket}/a.txt")


def test_from_env_uses_the_running_servers_env_file(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("PATCHGAP_HOME", str(s3_server.home))
    settings = S3Settings.from_env()
    assert settings.endpoint_url == s3_server.endpoint
    assert "env file" in settings.source
    Store(settings).put_bytes(b"x", f"s3://{s3_bucket}/via-env-file")
    # A remote endpoint never gets the local server's keys.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.com")
    assert S3Settings.from_env().access_key_id is None


def test_fetch_to_local_object_and_prefix(
    store: Store, s3_bucket: str, tree: Path, tmp_path: Path
) -> None:
    store.upload_dir(tree, f"s3://{s3_bucket}/ds/gsm8k")
    one = fetch_to_local(f"s3://{s3_bucket}/ds/gsm8k/metrics.json", tmp_path / "c", store)
    assert one == (tmp_path / "c" / "metrics.json").resolve() and one.read_text() == '{"acc": 0.5}'
    folder = fetch_to_local(f"s3://{s3_bucket}/ds/gsm8k/", tmp_path / "c", store)
    assert folder.name == "gsm8k" and (folder / "shards" / "2.jsonl").is_file()
    # A prefix without a manifest (an upload killed before it, or another tool's output) is
    # refused; only the explicit external path (the dataset staging step) copies it.
    store.put_bytes(b"q\n", f"s3://{s3_bucket}/raw/part-0.txt")
    with pytest.raises(StoreError, match=r"raw: no _manifest\.json.*patchgap data stage"):
        fetch_to_local(f"s3://{s3_bucket}/raw", tmp_path / "c", store)
    with pytest.raises(StoreError, match=r"part-0\.txt: not listed in a manifest"):
        fetch_to_local(f"s3://{s3_bucket}/raw/part-0.txt", tmp_path / "c", store)
    assert not (tmp_path / "c" / "raw").exists()
    raw = fetch_to_local(f"s3://{s3_bucket}/raw", tmp_path / "c", store, external=True)
    assert (raw / "part-0.txt").read_bytes() == b"q\n"


def test_killed_upload_is_never_consumed(
    store: Store, s3_bucket: str, tree: Path, tmp_path: Path
) -> None:
    out = f"s3://{s3_bucket}/runs/r1/candidates"
    store.upload_dir(tree, out)
    # As a first upload killed after its objects but before its manifest leaves it.
    store.delete(f"{out}/{MANIFEST_NAME}")
    store.put_bytes(b"half", f"{out}/shards/0.jsonl")
    with pytest.raises(StoreError, match="no _manifest.json"):
        fetch_to_local(out, tmp_path / "in", store)
    with pytest.raises(StoreError, match="not listed in a manifest"):
        fetch_to_local(f"{out}/shards/0.jsonl", tmp_path / "in", store)


def test_object_fetch_is_verified_against_its_manifest(
    store: Store, s3_bucket: str, tree: Path, tmp_path: Path
) -> None:
    out = f"s3://{s3_bucket}/ds/v"
    where = store.upload_dir(tree, out).location("metrics.json")
    store.put_bytes(b'{"acc": 0.9}', f"{out}/{where}")  # replaced after the manifest
    with pytest.raises(ChecksumError, match="metrics.json: checksum mismatch"):
        fetch_to_local(f"{out}/metrics.json", tmp_path / "in", store)
    assert not (tmp_path / "in" / "metrics.json").exists()


def test_data_stage_writes_a_manifest_the_stages_accept(
    store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    from patchgap.cli.data import app

    raw = f"s3://{s3_bucket}/incoming/mini.jsonl"
    store.put_file(RECORDS / "gsm8k_mini.jsonl", raw)
    staged = f"s3://{s3_bucket}/datasets/mini"
    res = CliRunner().invoke(app, ["stage", raw, staged, "--fields", "gsm8k"])
    assert res.exit_code == 0, res.output
    manifest = store.read_manifest(staged)
    assert manifest is not None and manifest.metadata["source"] == raw
    local = fetch_to_local(f"{staged}/records.jsonl", tmp_path / "in", store)
    assert local.read_bytes() == store.get_bytes(f"{staged}/{manifest.location('records.jsonl')}")


def test_artifacts_ls_and_get(store: Store, s3_bucket: str, tree: Path, tmp_path: Path) -> None:
    from patchgap.cli.artifacts import app

    out = f"s3://{s3_bucket}/runs/run-7/rewrite"
    written = store.upload_dir(tree, out, {"stage": "rewrite"})
    runner = CliRunner()
    listed = runner.invoke(app, ["ls", "run-7", "--bucket", s3_bucket])
    assert listed.exit_code == 0, listed.output
    assert "rewrite/shards/2.jsonl" in listed.output and "1 complete output" in listed.output

    dest = tmp_path / "got"
    got = runner.invoke(app, ["get", "run-7", str(dest)], env={"PATCHGAP_BUCKET": s3_bucket})
    assert got.exit_code == 0, got.output
    assert (dest / "rewrite" / "shards" / "2.jsonl").read_bytes() == (
        tree / "shards" / "2.jsonl"
    ).read_bytes()

    store.put_bytes(b"tampered", f"{out}/{written.location('metrics.json')}")
    bad = runner.invoke(app, ["get", "run-7", str(tmp_path / "got2"), "--bucket", s3_bucket])
    assert isinstance(bad.exception, ChecksumError)
    assert "rewrite/metrics.json" in str(bad.exception)


def test_parallel_multipart_upload_fits_the_connection_pool(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Four files in parallel, each sent in four parallel parts: urllib3 must never drop a
    connection with its "Connection pool is full" warning."""
    import logging

    mib = 1024 * 1024
    settings = dataclasses.replace(
        s3_server.store.settings,
        multipart_threshold=5 * mib,
        multipart_chunksize=5 * mib,
        max_concurrency=4,
    )
    src = tmp_path / "big"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.bin").write_bytes(os.urandom(20 * mib))
    caplog.set_level(logging.WARNING, logger="urllib3")
    Store(settings).upload_dir(src, f"s3://{s3_bucket}/pool", {})
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_conditional_put_against_the_real_server(store: Store, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/claims/x.json"
    assert store.put_bytes_if(b"1", uri, None)
    assert not store.put_bytes_if(b"2", uri, None)  # If-None-Match: * is honoured
    got = store.get_bytes_and_etag(uri)
    assert got is not None and got[0] == b"1"
    assert not store.put_bytes_if(b"3", uri, '"0123"')  # If-Match with a stale ETag
    assert store.put_bytes_if(b"4", uri, got[1]) and store.get_bytes(uri) == b"4"


def test_overlapping_watch_runs_claim_each_dataset_exactly_once(
    s3_server: S3Server, s3_bucket: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from patchgap.data.ledger import Ledger, find_datasets

    for i in range(6):
        s3_server.store.put_bytes(f'{{"q": {i}}}\n'.encode(), f"s3://{s3_bucket}/in/d{i}.jsonl")
    ledger_uri = f"s3://{s3_bucket}/ledger/watch"

    def one_run(_: int) -> list[str]:
        store = Store(s3_server.store.settings)  # each run its own client, as two pods would
        ledger = Ledger(store, ledger_uri)
        found = find_datasets(store, f"s3://{s3_bucket}/in/", cache_uri=ledger.hash_cache_uri())
        return [o.uri for o in ledger.claim_pending(found, lease_seconds=3600)]

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(one_run, range(4)))
    claimed = [uri for run in runs for uri in run]
    assert sorted(claimed) == [f"s3://{s3_bucket}/in/d{i}.jsonl" for i in range(6)]


def test_staging_records_the_hash_of_the_bytes_it_read(
    store: Store, s3_bucket: str, tmp_path: Path
) -> None:
    from patchgap.components.ops.component import stage_dataset

    class Art:
        def __init__(self, path: Path) -> None:
            self.path, self.metadata = str(path), {}

        def log_metric(self, key: str, value: float) -> None:
            self.metadata[key] = value

    uri = f"s3://{s3_bucket}/in/mini.jsonl"
    store.put_file(RECORDS / "gsm8k_mini.jsonl", uri)
    listed = hashlib.sha256(store.get_bytes(uri)).hexdigest()
    # Replaced between the listing and the staging step: the staged bytes' hash is recorded.
    store.put_bytes((RECORDS / "gsm8k_mini.jsonl").read_bytes()[:-1] + b" \n", uri)
    out = stage_dataset.python_func(
        dataset_uri=uri,
        fields="gsm8k",
        dataset=Art(tmp_path / "ds"),
        rejects=Art(tmp_path / "rej"),
        metrics=Art(tmp_path / "m"),
    )
    assert out.sha256 == hashlib.sha256(store.get_bytes(uri)).hexdigest() != listed
    manifest = Store().read_manifest(tmp_path / "ds")
    assert manifest is not None and manifest.metadata["source"] == uri
