"""The store on local paths and file:// URIs: URIs, manifests, verification, escape refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from patchgap.errors import ChecksumError, ConfigError, StoreError
from patchgap.storage.store import (
    MANIFEST_NAME,
    S3Settings,
    S3Url,
    Store,
    fetch_to_local,
    join_uri,
    parse_uri,
    safe_target,
    sha256_file,
)


@pytest.fixture
def store() -> Store:
    return Store(S3Settings())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "out"
    (src / "shards").mkdir(parents=True)
    (src / "shards" / "0.jsonl").write_text('{"a": 1}\n')
    (src / "shards" / "1.jsonl").write_text('{"a": 2}\n{"a": 3}\n')
    (src / "metrics.json").write_text("{}")
    return src


def test_parse_uri_kinds() -> None:
    assert parse_uri("s3://bkt/runs/x/a.txt") == S3Url("bkt", "runs/x/a.txt")
    assert parse_uri("s3://bkt") == S3Url("bkt", "")
    assert parse_uri("file:///tmp/a%20b/c") == Path("/tmp/a b/c")
    assert parse_uri("file://localhost/tmp/x") == Path("/tmp/x")
    assert parse_uri("rel/path.jsonl") == Path("rel/path.jsonl")
    assert join_uri("s3://bkt/runs/x/", "a", "b.txt") == "s3://bkt/runs/x/a/b.txt"
    assert join_uri("s3://bkt", "a") == "s3://bkt/a"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3:///key", "needs a bucket"),
        ("file://relative/x", "absolute path"),
        ("gs://bkt/x", "unsupported URI scheme 'gs'"),
    ],
)
def test_bad_uris_name_the_uri(uri: str, message: str) -> None:
    with pytest.raises(StoreError, match=message) as err:
        parse_uri(uri)
    assert uri in str(err.value)


@pytest.mark.parametrize(
    "key", ["../x", "/etc/passwd", "a/../../x", "a/./b", "a//b", "", "a\\..\\b", "..", "a/.."]
)
def test_escaping_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError, match="escape the target folder"):
        safe_target(tmp_path, key)


def test_safe_target_accepts_nested_keys(tmp_path: Path) -> None:
    assert safe_target(tmp_path, "a/b/c.txt") == tmp_path.resolve() / "a" / "b" / "c.txt"


def test_objects_on_local_paths_and_file_uris(store: Store, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/deep/a.bin"
    store.put_bytes(b"abc", uri)
    assert (tmp_path / "deep" / "a.bin").read_bytes() == b"abc"
    assert store.exists(uri) and store.exists(tmp_path / "deep" / "a.bin")
    assert store.get_bytes(str(tmp_path / "deep" / "a.bin")) == b"abc"
    store.put_file(tmp_path / "deep" / "a.bin", tmp_path / "copy" / "b.bin")
    got = store.get_file(tmp_path / "copy" / "b.bin", tmp_path / "back.bin")
    assert got.read_bytes() == b"abc"
    listed = store.list(f"file://{tmp_path}")
    assert [(o.key, o.size) for o in listed] == [
        ("back.bin", 3),
        ("copy/b.bin", 3),
        ("deep/a.bin", 3),
    ]
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # deleting twice is fine
    assert store.list(tmp_path / "nothing-here") == []


def test_missing_local_objects_name_the_path(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such"):
        store.get_bytes(tmp_path / "absent.txt")
    with pytest.raises(StoreError, match="absent.txt"):
        store.put_file(tmp_path / "absent.txt", tmp_path / "x")


def test_upload_download_round_trip_with_metadata(store: Store, tree: Path, tmp_path: Path) -> None:
    from patchgap.config import StrictModel

    class Cfg(StrictModel):
        lr: float = 1e-5

    dest = f"file://{tmp_path}/store/run1/rewrite"
    meta = {"config": Cfg(), "inputs": {"train": "ab" * 32}, "data": Path("/d/x.jsonl")}
    written = store.upload_dir(tree, dest, meta)
    assert set(written.files) == {"metrics.json", "shards/0.jsonl", "shards/1.jsonl"}
    assert written.files["shards/1.jsonl"].sha256 == sha256_file(tree / "shards" / "1.jsonl")

    read = store.read_manifest(dest)
    assert read is not None
    assert read.metadata == {
        "config": {"lr": 1e-5},
        "inputs": {"train": "ab" * 32},
        "data": "/d/x.jsonl",
    }
    assert read.files == written.files and read.patchgap_version

    out = tmp_path / "local"
    got = store.download_dir(dest, out)
    assert got.files == written.files
    for key in written.files:
        assert (out / key).read_bytes() == (tree / key).read_bytes()
    # The downloaded folder carries its manifest, and re-uploading it does not nest it.
    assert json.loads((out / MANIFEST_NAME).read_text())["files"].keys() == written.files.keys()
    again = store.upload_dir(out, f"{tmp_path}/store/run2", None)
    assert set(again.files) == set(written.files)


def test_manifest_is_written_last_and_stale_one_removed_first(
    store: Store, tree: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "store" / "out"
    store.upload_dir(tree, dest)
    writes: list[str] = []
    real_put_file, real_put_bytes = store.put_file, store.put_bytes

    def put_file(local: Path, uri: str) -> None:
        writes.append(Path(uri).name)
        # A reader looking mid-upload must not find the old manifest.
        assert store.read_manifest(dest) is None
        real_put_file(local, uri)

    def put_bytes(data: bytes, uri: str) -> None:
        writes.append(Path(uri).name)
        real_put_bytes(data, uri)

    store.put_file, store.put_bytes = put_file, put_bytes  # type: ignore[method-assign]
    store.upload_dir(tree, dest)
    assert writes[-1] == MANIFEST_NAME and writes.count(MANIFEST_NAME) == 1
    assert len(writes) == 4


def test_failed_upload_leaves_output_incomplete(store: Store, tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "store" / "out"
    store.upload_dir(tree, dest)

    def broken(local: Path, uri: str) -> None:
        raise StoreError(f"{uri}: simulated network failure")

    store.put_file = broken  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="simulated"):
        store.upload_dir(tree, dest)
    assert store.read_manifest(dest) is None
    with pytest.raises(StoreError, match="not complete"):
        Store(S3Settings()).download_dir(dest, tmp_path / "dl")


def test_tampered_object_raises_checksum_error(store: Store, tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "store" / "out"
    store.upload_dir(tree, dest)
    (dest / "shards" / "0.jsonl").write_text('{"a": 666}\n')
    out = tmp_path / "dl"
    with pytest.raises(ChecksumError, match=r"shards/0\.jsonl.*checksum mismatch"):
        store.download_dir(dest, out)
    # The corrupt copy is not left behind as if it were good.
    assert not (out / "shards" / "0.jsonl").exists()
    assert not list(out.rglob("*.part"))


def test_stale_bad_copy_is_removed_on_checksum_failure(
    store: Store, tree: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "store" / "out"
    store.upload_dir(tree, dest)
    out = tmp_path / "dl"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "0.jsonl").write_text("left over from an older download\n")
    (dest / "shards" / "0.jsonl").write_text('{"a": 666}\n')
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        store.download_dir(dest, out)
    assert not (out / "shards" / "0.jsonl").exists()


def test_manifest_listing_a_file_and_its_folder_is_one_clear_error(
    store: Store, tmp_path: Path
) -> None:
    dest = tmp_path / "store" / "clash"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "b").write_text("x")
    entry = {"sha256": sha256_file(dest / "a" / "b"), "size": 1}
    manifest = {"format": 1, "files": {"a": entry, "a/b": entry}}
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"'a' is listed both as a file and as the folder of"):
        store.download_dir(dest, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()


def test_manifest_with_escaping_key_downloads_nothing(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "store" / "evil"
    dest.mkdir(parents=True)
    (dest / "ok.txt").write_text("fine")
    manifest = {
        "format": 1,
        "files": {
            "ok.txt": {"sha256": sha256_file(dest / "ok.txt"), "size": 4},
            "../../escaped.txt": {"sha256": "0" * 64, "size": 1},
        },
    }
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    out = tmp_path / "a" / "b"
    with pytest.raises(StoreError, match=r"'\.\./\.\./escaped\.txt'.*escape"):
        store.download_dir(dest, out)
    assert not (out / "ok.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


def test_corrupt_manifest_names_its_uri(store: Store, tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(StoreError, match=f"{MANIFEST_NAME}: not a valid manifest"):
        store.read_manifest(tmp_path)


def test_fetch_to_local_returns_local_paths_as_they_are(tmp_path: Path) -> None:
    f = tmp_path / "data.jsonl"
    f.write_text("{}\n")
    assert fetch_to_local(str(f), tmp_path / "cache") == f
    assert fetch_to_local(f"file://{f}", tmp_path / "cache") == f
    assert not (tmp_path / "cache").exists()
    with pytest.raises(StoreError, match="missing.jsonl"):
        fetch_to_local(tmp_path / "missing.jsonl", tmp_path / "cache")


def test_settings_from_env() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_ENDPOINT_URL": "http://generic:1",
        "AWS_ENDPOINT_URL_S3": "http://s3-specific:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_RETRY_MODE": "adaptive",
        "AWS_MAX_ATTEMPTS": "7",
        "PATCHGAP_S3_MULTIPART_THRESHOLD_MB": "8",
    }
    s = S3Settings.from_env(env)
    assert (s.endpoint_url, s.region, s.access_key_id) == (
        "http://s3-specific:2",
        "eu-west-1",
        "AK",
    )
    assert (s.retry_mode, s.max_attempts, s.multipart_threshold) == ("adaptive", 7, 8 * 1024**2)
    assert s.addressing_style == "path"  # custom endpoints are S3-compatible servers
    s = S3Settings.from_env({**env, "PATCHGAP_S3_ENDPOINT": "http://mine:3"})
    assert s.endpoint_url == "http://mine:3"
    with pytest.raises(StoreError, match="PATCHGAP_S3_MAX_CONCURRENCY='many'"):
        S3Settings.from_env({**env, "PATCHGAP_S3_MAX_CONCURRENCY": "many"})
    with pytest.raises(StoreError, match="AWS_RETRY_MODE"):
        S3Settings.from_env({**env, "AWS_RETRY_MODE": "eager"})


def test_unreachable_endpoint_is_one_clear_error() -> None:
    from patchgap.storage.server import free_s3_port

    port = free_s3_port()  # nothing listens there
    store = Store(
        S3Settings(
            endpoint_url=f"http://127.0.0.1:{port}",
            access_key_id="AK",
            secret_access_key="SK",
            max_attempts=1,
        )
    )
    with pytest.raises(StoreError, match=rf"s3://bkt/x.*cannot reach S3 at .*:{port}"):
        store.get_bytes("s3://bkt/x")


def test_s3_object_operations_need_a_key() -> None:
    with pytest.raises(StoreError, match="needs an object key"):
        Store(S3Settings()).put_bytes(b"x", "s3://bkt/folder/")


def test_artifacts_cli_on_a_local_runs_root(store: Store, tree: Path, tmp_path: Path) -> None:
    from patchgap.cli.artifacts import app

    runs = tmp_path / "runs"
    store.upload_dir(tree, runs / "r1" / "rewrite", {"stage": "rewrite"})
    store.put_bytes(b"half", runs / "r1" / "sft" / "partial.bin")  # no manifest: incomplete
    runner = CliRunner()
    listed = runner.invoke(app, ["ls", "r1", "--root", str(runs)])
    assert listed.exit_code == 0, listed.output
    assert "rewrite/shards/1.jsonl" in listed.output and "incomplete" in listed.output
    assert "1 complete output" in listed.output

    dest = tmp_path / "dest"
    got = runner.invoke(app, ["get", "r1", str(dest), "--root", f"file://{runs}"])
    assert got.exit_code == 0, got.output
    assert (dest / "rewrite" / "shards" / "1.jsonl").read_text() == '{"a": 2}\n{"a": 3}\n'
    assert not (dest / "sft").exists() and "skipped sft/partial.bin" in got.output

    bad = runner.invoke(app, ["get", "../r1", str(dest), "--root", str(runs)])
    assert isinstance(bad.exception, ConfigError) and "not valid" in str(bad.exception)
    none = runner.invoke(app, ["ls", "r2", "--root", str(runs)])
    assert isinstance(none.exception, StoreError) and "no objects" in str(none.exception)


def test_ports_and_env_file_helpers(tmp_path: Path) -> None:
    from patchgap.storage.server import EmbeddedS3, Ports, read_env_file

    ports = [p for _, p in Ports(8333).all()]
    assert len(set(ports)) == 10 and 8888 not in ports and 9333 not in ports
    with pytest.raises(StoreError, match="S3 port 65000 is out of range"):
        Ports(65000)
    server = EmbeddedS3(tmp_path, 18000, bucket=None)
    env = server.env()  # generates credentials on first use
    assert oct(os.stat(server.env_file).st_mode & 0o777) == "0o600"
    assert read_env_file(server.env_file) == env
    assert EmbeddedS3(tmp_path, bucket=None).endpoint == "http://127.0.0.1:18000"  # remembered
    assert (
        EmbeddedS3(tmp_path, bucket=None).env()["AWS_SECRET_ACCESS_KEY"]
        == (env["AWS_SECRET_ACCESS_KEY"])
    )


def test_secrets_stay_out_of_reprs() -> None:
    from patchgap.storage.credentials import Credentials

    settings = S3Settings(
        access_key_id="AKVISIBLE", secret_access_key="SKHIDDEN", session_token="TK"
    )
    creds = Credentials.generate()
    for shown in (repr(settings), str(settings), repr(creds), f"{creds!s}"):
        assert "SKHIDDEN" not in shown and "TK'" not in shown
        assert creds.secret_access_key not in shown
    assert "AKVISIBLE" in repr(settings)  # the key id is not a secret and helps debugging
