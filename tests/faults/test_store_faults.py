"""The store under faults: the S3 server restarted in the middle of a multipart upload and of a
download, and two watch runs claiming datasets over one prefix at the same moment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from patchgap.errors import StoreError
from patchgap.storage.store import S3Settings, Store

pytestmark = pytest.mark.faults

MiB = 1024 * 1024


@pytest.fixture
def small_parts(s3_server) -> Iterator[Store]:
    """A client that uploads and downloads in 5 MiB parts, so a 24 MiB file takes several."""
    settings = S3Settings.from_env(
        {
            **os.environ,
            "PATCHGAP_S3_MULTIPART_THRESHOLD_MB": "5",
            "PATCHGAP_S3_MULTIPART_CHUNK_MB": "5",
            "PATCHGAP_S3_MAX_CONCURRENCY": "2",
        }
    )
    yield Store(settings)


def _restart_on_first(store: Store, server, operation: str) -> threading.Thread:
    """Stop the server as the first ``operation`` request leaves, and start it again in the
    background: that request and the ones after it meet a dead port for a while."""

    def start_again() -> None:
        # The old process's sockets may linger a moment after it exits.
        for _ in range(40):
            try:
                server.start(wait=True)
                return
            except StoreError:
                time.sleep(0.5)
        server.start(wait=True)

    restarted = threading.Thread(target=start_again)
    fired = threading.Lock()

    def hook(**_: object) -> None:
        if fired.acquire(blocking=False):
            server.stop(timeout=10)
            restarted.start()

    store.client.meta.events.register(f"before-send.s3.{operation}", hook)
    return restarted


def _carried_or_one_line(action, uri: str) -> bool:
    """Run ``action``: True if retries carried it through; on failure the error must be one line
    naming ``uri``, and False says a rerun is needed."""
    try:
        action()
    except StoreError as err:
        text = str(err)
        assert "\n" not in text and uri in text, text
        return False
    return True


@pytest.mark.parametrize("operation", ["UploadPart", "GetObject"])
def test_s3_restart_mid_transfer_is_carried_or_resumed(
    s3_server, s3_bucket: str, small_parts: Store, tmp_path: Path, operation: str
) -> None:
    src = tmp_path / "out"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(24 * MiB))
    (src / "small.json").write_text('{"a": 1}')
    uri = f"s3://{s3_bucket}/runs/r/model"
    dest = tmp_path / "dl"

    if operation == "UploadPart":
        restarted = _restart_on_first(small_parts, s3_server.server, operation)
        first = _carried_or_one_line(lambda: small_parts.upload_dir(src, uri), uri)
        restarted.join(timeout=60)
        if not first:  # a failed upload left no manifest: nothing will consume it
            assert small_parts.read_manifest(uri) is None
            small_parts.upload_dir(src, uri)
        small_parts.download_dir(uri, dest)
    else:
        small_parts.upload_dir(src, uri)
        restarted = _restart_on_first(small_parts, s3_server.server, operation)
        first = _carried_or_one_line(lambda: small_parts.download_dir(uri, dest), uri)
        restarted.join(timeout=60)
        if not first:
            small_parts.download_dir(uri, dest)  # resumes; verified against the manifest
    assert (dest / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert not list(dest.rglob("*.part")) and not list(dest.rglob("*.tmp"))


CLAIM = """
import json, sys
from patchgap.components.ops.component import find_new_datasets
sys.stdin.readline()  # both processes start claiming at the same moment
print(json.dumps(find_new_datasets.python_func(
    prefix_uri=sys.argv[1], ledger_uri=sys.argv[2], max_datasets=0, claim_hours=1.0
)))
"""


def test_two_watch_runs_at_once_take_each_dataset_exactly_once(s3_server, s3_bucket: str) -> None:
    prefix, ledger = f"s3://{s3_bucket}/incoming/", f"s3://{s3_bucket}/ledger/watch"
    for i in range(8):
        s3_server.store.put_bytes(f'{{"question": "q{i}"}}\n'.encode(), f"{prefix}d{i}.jsonl")
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM, prefix, ledger],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for run in runs:
        run.stdin.write("go\n")
        run.stdin.flush()
    claimed = []
    for run in runs:
        out, _ = run.communicate(timeout=300)
        assert run.returncode == 0
        claimed += [item["uri"] for item in json.loads(out.strip().splitlines()[-1])]
    assert sorted(claimed) == [f"{prefix}d{i}.jsonl" for i in range(8)]  # once each, none lost
