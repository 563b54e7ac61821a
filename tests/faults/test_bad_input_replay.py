"""Replay each class of bad input through the real ``patchgap`` entry point, in its own process:
one line on stderr naming the file (line:column where there is one), exit code 2, and nothing
started before the input was checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.faults

GOOD_RUN = {"run": {"dataset": {"source": "gsm8k:train", "limit": 2}}}


def _patchgap(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PATCHGAP_"))}
    env["PATCHGAP_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "patchgap.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=home.parent,  # `data validate` writes its rejects file beside the caller
    )


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


CASES = {
    # name: (file name, content, command, what the one line says)
    "deep-json": ("d.json", "[" * 100_000 + "]" * 100_000, "validate", r"d\.json:1:2: .*deeply"),
    "huge-int": ("d.json", '[{"q": ' + "7" * 5000 + "}]", "validate", r"d\.json:1:2: .*digits"),
    "deep-yaml": ("run.yaml", "run: " + "[" * 50_000, "run", r"run\.yaml: .*nested too deeply"),
    "not-utf8": ("run.yaml", b"run:\n  bucket: b\xffad\n", "run", r"run\.yaml:2: not UTF-8"),
    "misspelled": (
        "run.yaml",
        yaml.safe_dump({**GOOD_RUN, "gatee": {"judge": False}}),
        "run",
        r"run\.yaml: unknown top-level key 'gatee'; did you mean 'gate'\?",
    ),
    "markup": (
        "run.yaml",
        yaml.safe_dump({**GOOD_RUN, "[gate] gsm8k:train: [/red]": 1}),
        "run",
        r"unknown top-level key '\[gate\] gsm8k:train: \[/red\]'",
    ),
    "bad-stage-value": (
        "run.yaml",
        yaml.safe_dump({**GOOD_RUN, "sft": {"num_epochs": "many"}}),
        "run",
        r"run\.yaml \[sft\]: num_epochs",
    ),
    "all-rejected": (
        "d.jsonl",
        '{"question": "no answer", "answer": ""}\n{"question": "none", "answer": null}\n',
        "validate",
        r"d\.jsonl: no valid records \(2 read, all rejected\)",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    name, content, command, expected = CASES[case]
    path = _write(tmp_path / name, content)
    args = ["run", "--config", str(path)] if command == "run" else ["data", "validate", str(path)]
    res = _patchgap(args, tmp_path / "home")
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert re.search(expected, lines[0]), lines[0]
    # Validated before any side effect: no store was started, nothing staged.
    assert not (tmp_path / "home" / "seaweedfs").exists()


def test_catastrophic_answer_pattern_is_one_line(tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", json.dumps({"q": "x", "a": "a" * 40 + "c"}) + "\n")
    fields = _write(
        tmp_path / "fields.yaml",
        yaml.safe_dump({"question": "q", "answer": "a", "answer_pattern": "((a|a)+)b"}),
    )
    res = _patchgap(["data", "validate", str(data), "--fields", str(fields)], tmp_path / "home")
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "answer_pattern '((a|a)+)b' took over" in line
