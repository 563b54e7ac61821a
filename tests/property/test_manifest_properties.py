"""The manifest verifier: random or corrupted manifest bytes (truncated, bytes flipped, values
out of range, deep nesting) give a manifest or one clear :class:`StoreError` line naming it;
through ``patchgap artifacts ls|get`` the same bytes give exit code 0 or one ``error:`` line."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from patchgap.cli.main import cli
from patchgap.errors import StoreError
from patchgap.storage.store import Manifest

pytestmark = pytest.mark.property

GOOD = json.dumps(
    {
        "format": 1,
        "created_at": "2026-01-01T00:00:00Z",
        "patchgap_version": "0",
        "files": {"a.jsonl": {"sha256": "0" * 64, "size": 3}},
        "metadata": {"stage": "rewrite"},
    }
).encode()


@st.composite
def _corrupted(draw: st.DrawFn) -> bytes:
    data = bytearray(GOOD)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


_VALUES = st.one_of(
    st.sampled_from(["1e999", "-1", "-1e999", "NaN", "Infinity", "3.5", '"3"', "null", "[]"]),
    st.integers().map(str),
)
_BYTES = st.one_of(
    st.binary(max_size=200),
    _corrupted(),
    _VALUES.map(lambda v: GOOD.replace(b'"size": 3', b'"size": ' + v.encode())),
    _VALUES.map(lambda v: GOOD.replace(b'"format": 1', b'"format": ' + v.encode())),
    st.integers(1, 5000).map(lambda n: b'{"files": ' + b"[" * n + b"]" * n + b"}"),
    st.sampled_from([b"[]", b"{}", b'{"files": []}', b'{"files": {"a": 1}}', b"\xff\xfe"]),
)


@settings(max_examples=300)
@given(_BYTES)
def test_manifest_bytes_parse_or_are_one_line(data: bytes) -> None:
    try:
        manifest = Manifest.from_json(data, "s3://b/runs/r/_manifest.json")
    except StoreError as err:
        message = str(err)
        assert "\n" not in message and message.startswith("s3://b/runs/r/_manifest.json")
        return
    assert all(e.size >= 0 for e in manifest.files.values())


@settings(max_examples=40)
@given(_BYTES)
def test_the_cli_on_a_corrupted_manifest_is_one_line(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        (runs / "r1" / "out").mkdir(parents=True)
        (runs / "r1" / "out" / "a.jsonl").write_bytes(b"abc")
        (runs / "r1" / "out" / "_manifest.json").write_bytes(data)
        for command in (["ls", "r1"], ["get", "r1", str(Path(tmp) / "dest")]):
            res = CliRunner().invoke(cli, ["artifacts", *command, "--root", str(runs)])
            assert res.exit_code in (0, 2), (command, res.output, res.exception)
            assert "Traceback" not in res.output
            if res.exit_code == 2:
                errors = [line for line in res.output.splitlines() if line.startswith("error:")]
                assert len(errors) == 1, res.output
