"""``patchgap artifacts get`` against a hostile run: manifests listing keys that climb out
(``../``), absolute keys, odd keys, and symbolic links planted in the destination beforehand.
Whatever the keys and links, nothing outside the destination folder is created or changed,
and the command ends with exit code 0 or one ``error:`` line and exit code 2."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from patchgap.cli.main import cli

pytestmark = pytest.mark.property

# Keys a well-formed run has: a download gets as far as writing its manifest only when every
# key of the output is fine, so these are drawn as often as the hostile ones.
_FINE = st.sampled_from(["ok.txt", "sub/ok.txt", "link/inside.txt", "filelink", "sub/deep/x"])
_KEYS = st.one_of(
    _FINE,
    st.sampled_from(
        [
            "../escaped.txt",
            "../../escaped.txt",
            "/tmp/escaped.txt",
            "a/../../escaped.txt",
            "ok.txt",
            "sub/ok.txt",
            "link/inside.txt",
            "filelink",
            "_manifest.json",
            "a//b",
            "./x",
            "",
            "a\\..\\..\\x",
            "nul\0byte",
            "sub",
        ]
    ),
    st.text(alphabet="ab./\\_", min_size=1, max_size=12),
)
# Names planted in the destination's output folder as links to a folder or a file outside.
_LINKS = st.lists(st.sampled_from(["link", "filelink", "_manifest.json", "sub", "ok.txt"]))


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[bytes | str, int]]:
    """Every entry under ``root`` except ``skip``: content (or link target) and mode."""
    out: dict[str, tuple[bytes | str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            continue
        for name in dirnames + filenames:
            p = here / name
            if p == skip:
                continue
            if p.is_symlink():
                out[str(p)] = (os.readlink(p), 0)
            elif p.is_file():
                out[str(p)] = (p.read_bytes(), p.stat().st_mode)
            else:
                out[str(p)] = ("dir", p.stat().st_mode)
    return out


def _hostile_run(runs: Path, keys: list[str]) -> None:
    out = runs / "r1" / "out"
    out.mkdir(parents=True)
    files = {}
    for key in keys:
        body = f"content of {key!r}".encode()
        files[key] = {"sha256": hashlib.sha256(body).hexdigest(), "size": len(body)}
        # Store the object where a plain join would put it, when that path can exist inside
        # the run; a climbing key has no object, which the download must refuse before it.
        try:
            target = (out / key).resolve()
            if target.is_relative_to(out.resolve()) and target != out.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.is_dir():
                    target.write_bytes(body)
        except (OSError, ValueError):
            pass
    manifest = {"format": 1, "files": files, "metadata": {}}
    (out / "_manifest.json").write_text(json.dumps(manifest))


@settings(max_examples=80)
@given(st.lists(_KEYS, min_size=1, max_size=3, unique=True), _LINKS)
@example(["ok.txt"], ["_manifest.json"])
@example(["link/inside.txt"], ["link"])
@example(["../escaped.txt"], [])
def test_artifacts_get_never_writes_outside_the_destination(
    keys: list[str], links: list[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        runs, dest, outside = base / "runs", base / "dest", base / "outside"
        (outside / "folder").mkdir(parents=True)
        (outside / "file.txt").write_text("precious")
        _hostile_run(runs, keys)
        (dest / "out").mkdir(parents=True)
        for name in set(links):
            target = outside / ("file.txt" if "." in name or name == "filelink" else "folder")
            (dest / "out" / name).symlink_to(target)
        before = _snapshot(base, skip=dest)

        res = CliRunner().invoke(cli, ["artifacts", "get", "r1", str(dest), "--root", str(runs)])

        assert res.exit_code in (0, 2), (res.output, res.exception)
        assert "Traceback" not in res.output
        if res.exit_code == 2:
            errors = [line for line in res.output.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, res.output
        assert _snapshot(base, skip=dest) == before
