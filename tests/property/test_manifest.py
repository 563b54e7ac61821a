"""Manifests as a hostile store could hold them: random or corrupted bytes, format-2 fields
(``attempt``, ``generation``) out of range or aiming outside the output. Each gives a manifest
whose objects lie under its own attempt, or one :class:`StoreError` line naming the file;
never a traceback from a reader."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchgap.errors import StoreError
from patchgap.storage.store import (
    ATTEMPTS_DIR,
    MANIFEST_NAME,
    Manifest,
    ManifestEntry,
    Store,
    published_folder,
)

pytestmark = pytest.mark.property

# Small fixed budgets: the tier runs on shared CPUs.
_FEW = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SOURCE = "s3://b/runs/r/out/_manifest.json"

GOOD = Manifest(
    files={
        "records.jsonl": ManifestEntry("a" * 64, 3),
        "shards/0.jsonl": ManifestEntry("b" * 64, 0),
    },
    metadata={"stage": "rewrite"},
    created_at="2026-01-01T00:00:00+00:00",
    patchgap_version="0",
    format=2,
    attempt="7-0123456789abcdef",
    generation=7,
)
GOOD_BYTES = GOOD.to_json().encode()

_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["../x", "1-ab/../../c", "1-", "-1-ab", "x" * 200, "1-ABCDEF", "0-0/1"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@st.composite
def _field_replaced(draw: st.DrawFn) -> bytes:
    """GOOD with one field (top level or of one file entry) set to junk or removed."""
    data = json.loads(GOOD_BYTES)
    where = draw(st.sampled_from(["format", "attempt", "generation", "files", "metadata", "entry"]))
    target, name = (
        (data["files"]["records.jsonl"], draw(st.sampled_from(["sha256", "size"])))
        if where == "entry"
        else (data, where)
    )
    if draw(st.booleans()):
        target[name] = draw(_JUNK)
    else:
        target.pop(name, None)
    return json.dumps(data, allow_nan=True).encode()


@st.composite
def _flipped(draw: st.DrawFn) -> bytes:
    data = bytearray(GOOD_BYTES)
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


_BYTES = st.one_of(
    st.binary(max_size=300),
    _flipped(),
    _field_replaced(),
    st.integers(1, 3000).map(lambda n: b'{"files": ' + b"[" * n + b"]" * n + b"}"),
)


def _check(manifest: Manifest) -> None:
    """What a reader relies on in a manifest that parsed."""
    for key, entry in manifest.files.items():
        assert len(entry.sha256) == 64 and entry.size >= 0
        where = manifest.location(key)
        if manifest.format == 2:
            assert where == f"{ATTEMPTS_DIR}/{manifest.attempt}/{key}"
            assert "/" not in manifest.attempt and ".." not in manifest.attempt
            assert manifest.generation == int(manifest.attempt.split("-")[0])
        else:
            assert where == key and manifest.attempt == ""


def test_a_written_manifest_reads_back_whole() -> None:
    again = Manifest.from_json(GOOD_BYTES, SOURCE)
    assert again == GOOD
    _check(again)


@_FEW
@given(_BYTES)
def test_manifest_bytes_parse_or_give_one_line_naming_the_file(data: bytes) -> None:
    try:
        manifest = Manifest.from_json(data, SOURCE)
    except StoreError as err:
        text = str(err)
        assert text.startswith(f"{SOURCE}: not a valid manifest (") and "\n" not in text
        return
    _check(manifest)


@settings(_FEW, max_examples=40)
@given(_BYTES)
def test_readers_of_a_corrupted_local_output_give_one_line(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        (out / ATTEMPTS_DIR / GOOD.attempt).mkdir(parents=True)
        (out / MANIFEST_NAME).write_bytes(data)
        # A copy taken as it is: a broken manifest there means the folder is used as it is.
        assert published_folder(out) in (out, out / ATTEMPTS_DIR / GOOD.attempt)
        try:
            Store().download_dir(out, Path(tmp) / "dest")
        except StoreError as err:
            assert "\n" not in str(err)
