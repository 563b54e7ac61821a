"""What the CLI guarantees about the files and text a user hands it, each checked through the
real command: an output never destroys an input, outputs are whole or absent, config parsing is
bounded (no alias expansion, no inf/NaN, identifiers matched in full), and every error a user
can cause is one line naming the file, key or URI, with exit code 2."""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from patchgap.cli.main import cli
from patchgap.errors import ConfigError, PatchgapError, user_message
from patchgap.fsutil import atomic_path, refuse_output_over_input, write_text_atomic

GSM8K = '{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
# 455 bytes that expand to 9**9 strings in a plain YAML loader.
LAUGHS = "sft:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  {n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def _invoke(args: list[str]) -> Result:
    return CliRunner().invoke(cli, args)


def _one_line(res: Result, *needles: str) -> str:
    """The result is exit code 2 and exactly one non-empty line, ``error: ...``, naming each of
    ``needles``."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, (res.output, res.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------ no destroyed inputs


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_rejects_onto_the_input_is_refused_and_the_input_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    data = tmp_path / "v.jsonl"
    data.write_text(GSM8K + "not json\n")
    before = data.read_bytes()
    (tmp_path / "sub").mkdir()
    rejects = {
        "same": data,
        "dotdot": tmp_path / "sub" / ".." / "v.jsonl",
        "symlink": tmp_path / "link.jsonl",
        "hardlink": tmp_path / "hard.jsonl",
    }[spelling]
    if spelling == "symlink":
        rejects.symlink_to(data)
    if spelling == "hardlink":
        os.link(data, rejects)
    monkeypatch.chdir(tmp_path)
    res = _invoke(["data", "validate", str(data), "--rejects", str(rejects)])
    _one_line(res, "--rejects", "is the input")
    assert data.read_bytes() == before


def test_rejects_to_a_folder_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "v.jsonl"
    data.write_text(GSM8K + "not json\n")
    res = _invoke(["data", "validate", str(data), "--rejects", str(tmp_path)])
    _one_line(res, str(tmp_path))


def test_stage_output_onto_its_input_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "x.jsonl").write_text(GSM8K)
    res = _invoke(
        ["stage", "gate", "--input", f"dataset={folder}", "--output", f"dataset_r={folder}"]
    )
    _one_line(res, "--output dataset_r", "is the input")
    assert (folder / "x.jsonl").read_text() == GSM8K


def test_an_output_folder_holding_an_input_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    src = tmp_path / "out" / "d.jsonl"
    src.write_text(GSM8K)
    with pytest.raises(ConfigError, match="holds the input"):
        refuse_output_over_input(tmp_path / "out", [src, "s3://b/k", None])
    refuse_output_over_input(tmp_path / "other.jsonl", [src, "s3://b/k", None])  # no error


def test_report_never_replaces_a_file_without_its_markers(tmp_path: Path) -> None:
    from patchgap.reports.results import RunResults, write

    readme = tmp_path / "README.md"
    readme.write_text("# my notes\n")
    with pytest.raises(ConfigError, match="no .* markers"):
        write(RunResults(run_id="r", manifest={}), readme)
    assert readme.read_text() == "# my notes\n"


# ------------------------------------------------------------------ atomic outputs


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_no_write_follows_a_symlink_out_of_its_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    folder = tmp_path / "dest"
    folder.mkdir()
    (folder / "_manifest.json").symlink_to(outside)
    with pytest.raises(ConfigError, match="symbolic link"):
        write_text_atomic(folder / "_manifest.json", "{}")
    assert outside.read_text() == "precious"
    assert sorted(p.name for p in folder.iterdir()) == ["_manifest.json"]


def _local_run(tmp_path: Path) -> Path:
    from patchgap.storage.store import S3Settings, Store

    tree = tmp_path / "tree"
    (tree / "shards").mkdir(parents=True)
    (tree / "shards" / "0.jsonl").write_text('{"a": 1}\n')
    runs = tmp_path / "runs"
    Store(S3Settings()).upload_dir(tree, runs / "r1" / "rewrite", {"stage": "rewrite"})
    return runs


def test_artifacts_get_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    runs = _local_run(tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    dest = tmp_path / "dest"
    (dest / "rewrite").mkdir(parents=True)
    (dest / "rewrite" / "_manifest.json").symlink_to(outside)
    res = _invoke(["artifacts", "get", "r1", str(dest), "--root", str(runs)])
    _one_line(res, "_manifest.json", "symbolic link")
    assert outside.read_text() == "precious"


@pytest.mark.parametrize("case", ["dest_is_a_file", "key_place_is_a_folder"])
def test_artifacts_get_into_the_wrong_kind_of_path_is_one_line(tmp_path: Path, case: str) -> None:
    runs = _local_run(tmp_path)
    dest = tmp_path / "dest"
    if case == "dest_is_a_file":
        dest.write_text("x")
    else:
        (dest / "rewrite" / "shards" / "0.jsonl").mkdir(parents=True)
    res = _invoke(["artifacts", "get", "r1", str(dest), "--root", str(runs)])
    _one_line(res, str(dest))


# ------------------------------------------------------------------ bounded parsing


def test_a_billion_laughs_run_yaml_is_refused_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(LAUGHS)
    assert len(LAUGHS.encode()) < 500
    started = time.monotonic()
    res = _invoke(["stage", "sft", "-c", str(cfg)])
    assert time.monotonic() - started < 1.0
    _one_line(res, str(cfg), "alias")


def test_an_alias_in_an_override_is_refused(tmp_path: Path) -> None:
    res = _invoke(["stage", "sft", "--set", "num_epochs=[&a [1, 2], *a, *a]"])
    _one_line(res, "override 'num_epochs'", "alias")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("sft.num_epochs", ".inf"),
        ("sft.learning_rate", ".nan"),
        ("gate.reward.lambda_dist", ".inf"),
        ("rewrite.generation.temperature", "-.inf"),
    ],
)
def test_inf_and_nan_settings_are_refused(key: str, value: str) -> None:
    from patchgap.stages import STAGES
    from patchgap.stages.base import load_stage_config, stage_module

    section, _, inner = key.partition(".")
    assert section in STAGES
    module = stage_module(section)
    with pytest.raises(ConfigError, match=rf"{inner}: must be a finite number"):
        load_stage_config(module.Config, None, section, [f"{inner}={value}"])


@pytest.mark.parametrize(
    ("run", "needle"),
    [
        ("bucket: a/b", "bucket"),
        ("bucket: Patchgap", "bucket"),
        ("dataset_key: ../..", "dataset_key"),
        ("dataset_key: /etc/passwd", "dataset_key"),
        ("dataset_key: a//b.jsonl", "dataset_key"),
    ],
)
def test_run_identifiers_must_match_in_full(tmp_path: Path, run: str, needle: str) -> None:
    from patchgap.run.prepare import load_run_settings

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run:\n  {run}\n  dataset: {{source: gsm8k}}\n")
    with pytest.raises(ConfigError, match=needle):
        load_run_settings(cfg)


def test_a_run_id_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    res = _invoke(["artifacts", "ls", "r1\n", "--root", str(tmp_path)])
    _one_line(res, "run id 'r1\\n'")


def test_store_up_with_a_bad_bucket_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    res = _invoke(["store", "up", "--home", str(tmp_path / "home"), "--bucket", "a/b"])
    _one_line(res, "'a/b'", "bucket")
    assert not (tmp_path / "home").exists()


def test_a_pipeline_package_with_aliases_is_refused(tmp_path: Path) -> None:
    package = tmp_path / "bomb.yaml"
    package.write_text(LAUGHS)
    res = _invoke(["submit", str(package), "--host", "http://127.0.0.1:9"])
    _one_line(res, str(package), "aliases")


def test_a_bad_submit_parameter_is_one_line() -> None:
    res = _invoke(["submit", "-p", "tolerations=[unclosed", "--host", "http://127.0.0.1:9"])
    _one_line(res, "tolerations")


# ------------------------------------------------------------------ models and safetensors


def _model_folder(tmp_path: Path, config: str, weights: bytes | None) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def _safetensors(declared_data: int, actual_data: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, declared_data]}})
    return struct.pack("<Q", len(header)) + header.encode() + b"\0" * actual_data


@pytest.mark.parametrize(
    ("config", "weights", "needle"),
    [
        ("{broken", None, "config.json:1:2: invalid JSON"),
        ('{"model_type": "llama"}', struct.pack("<Q", 64 << 30) + b"{}", "declares 68719476736"),
        ('{"model_type": "llama"}', _safetensors(16, 8), "truncated"),
    ],
)
def test_models_info_on_broken_files_is_one_line(
    tmp_path: Path, config: str, weights: bytes | None, needle: str
) -> None:
    folder = _model_folder(tmp_path, config, weights)
    _one_line(_invoke(["models", "info", str(folder)]), needle)


def test_a_truncated_safetensors_file_is_refused_before_the_loader(tmp_path: Path) -> None:
    from patchgap.lm.models import load_causal_lm

    folder = _model_folder(tmp_path, '{"model_type": "llama"}', _safetensors(16, 8))
    with pytest.raises(ConfigError, match=r"model\.safetensors: .*truncated"):
        load_causal_lm(folder)


# ------------------------------------------------------------------ the one mapping


def test_the_mapping_gives_one_line_per_family(tmp_path: Path) -> None:
    import yaml
    from botocore.exceptions import ClientError, ParamValidationError
    from safetensors import SafetensorError

    cases: list[BaseException] = [
        PatchgapError("a.yaml: bad\nsecond line"),
        IsADirectoryError(21, "Is a directory", str(tmp_path)),
        ParamValidationError(report='Invalid bucket name "a/b"'),
        ClientError({"Error": {"Code": "NoSuchBucket", "Message": "gone"}}, "ListObjectsV2"),
        yaml.YAMLError("bad\nyaml"),
        json.JSONDecodeError("Expecting value", "{\n", 2),
        SafetensorError("Error while deserializing header: MetadataIncompleteBuffer"),
        MemoryError(),
    ]
    for err in cases:
        line = user_message(err)
        assert line and "\n" not in line, (err, line)
    assert str(tmp_path) in user_message(cases[1])
    assert "a/b" in user_message(cases[2]) and "NoSuchBucket" in user_message(cases[3])
    assert user_message(KeyError("defect")) is None  # a bug keeps its traceback
