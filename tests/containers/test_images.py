"""The built images run what the compiled pipelines call, and a small pipeline runs in them
under kfp.local's DockerRunner with the model and data going through the embedded S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets" / "records"
STAGE_IMAGES = ("train_rewriter", "rewrite", "gate", "sft", "evaluate")


def _executors() -> dict[tuple[str, str], dict[str, Any]]:
    """(image, function) -> the container spec the compiled YAML gives that step."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((ROOT / "pipelines" / "compiled").glob("*.yaml")):
        spec = next(yaml.safe_load_all(path.read_text()))
        executors = spec["deploymentSpec"]["executors"].values()
        for container in (e["container"] for e in executors if "container" in e):
            function = container["args"][container["args"].index("--function_to_execute") + 1]
            out.setdefault((container["image"], function), container)
    return out


EXECUTORS = _executors()


def _run(engine: Any, image: str, command: list[str]) -> tuple[int, str]:
    container = engine.containers.run(image, command, detach=True, network_mode="host")
    try:
        code = container.wait()["StatusCode"]
        return code, container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


@pytest.mark.parametrize("key", sorted(EXECUTORS), ids=lambda k: f"{k[0].split('/')[-1]}-{k[1]}")
def test_image_runs_the_compiled_command(engine: Any, key: tuple[str, str]) -> None:
    # The exact command and arguments of the compiled step, with an executor input that has no
    # inputs: kfp's executor must start, load the component and parse its arguments; the call
    # then fails inside the function (a missing parameter, or an unwired artifact).
    image, function = key
    container = EXECUTORS[key]
    executor_input = json.dumps({"inputs": {}, "outputs": {"outputFile": "/tmp/out.json"}})
    args = [executor_input if a == "{{$}}" else a for a in container["args"]]
    code, logs = _run(engine, image, container["command"] + args)
    assert code != 0
    assert f'Loading KFP component "{function}"' in logs, logs[-2000:]
    reached = f"TypeError: {function}() missing" in logs or f", in {function}\n" in logs
    assert reached, logs[-2000:]


@pytest.mark.parametrize("stage", STAGE_IMAGES)
def test_stage_image_command_shows_the_stage_help(engine: Any, stage: str) -> None:
    from patchgap.kfp.images import image_for

    image = engine.images.get(image_for(stage))
    assert not image.attrs["Config"].get("Entrypoint")  # KFP gives the whole command line
    code, logs = _run(engine, image_for(stage), image.attrs["Config"]["Cmd"])
    assert code == 0, logs[-2000:]
    assert "usage" in logs.lower() and stage.replace("_", "-") in logs.replace("_", "-")


def test_ops_image_has_kfp_and_no_torch(engine: Any) -> None:
    from patchgap.kfp.images import image_for

    probe = (
        "import importlib.util as u, kfp; "
        "print('kfp', kfp.__version__, 'torch', u.find_spec('torch') is not None)"
    )
    code, logs = _run(engine, image_for("ops"), ["python", "-c", probe])
    assert code == 0, logs
    assert "torch False" in logs and "kfp 2." in logs


def test_unreachable_s3_is_one_line_before_any_stage(engine: Any, tmp_path: Path) -> None:
    from patchgap.errors import ConfigError
    from patchgap.run.containers import check_s3_from_container
    from patchgap.run.prepare import PreparedRun, RunSettings

    prepared = PreparedRun(
        config_path=tmp_path / "x.yaml",
        raw={},
        settings=RunSettings(dataset={"source": "x"}),
        run_id="x",
        dataset_uri="s3://patchgap/datasets/x.jsonl",
        model_path="x",
    )
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "a"}
    env |= {"AWS_SECRET_ACCESS_KEY": "b", "AWS_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    with pytest.raises(ConfigError, match="cannot reach S3 at http://127.0.0.1:9") as err:
        check_s3_from_container(engine, prepared, env)
    assert "\n" not in str(err.value)


def test_image_not_built_is_one_line(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from patchgap.errors import ConfigError
    from patchgap.run.containers import check_images

    monkeypatch.setenv("PATCHGAP_IMAGE_TAG", "not-built")
    with pytest.raises(ConfigError, match=r"patchgap-ops:not-built.*make images"):
        check_images(engine, "full")


def _config(tmp: Path, model: Path, bucket: str) -> Path:
    dataset = {"source": str(ASSETS / "gsm8k_mini.jsonl"), "fields": "gsm8k"}
    cfg = {
        "model": str(model),
        "seed": 0,
        "run": {"pipeline": "full", "bucket": bucket, "dataset": dataset, "num_shards": 1},
        "train_rewriter": {
            "num_generations": 2,
            "prompts_per_step": 2,
            "per_device_batch_size": 2,
            "max_prompt_length": 256,
            "max_completion_length": 8,
            "max_steps": 1,
            "checkpoint_uri": f"s3://{bucket}/checkpoints/rewriter",
        },
        "rewrite": {
            "generation": {"max_new_tokens": 8, "batch_size": 4},
            "state_uri": f"s3://{bucket}/state",
        },
        "gate": {"batch_records": 4},
        "sft": {"max_length": 256, "num_epochs": 1, "per_device_batch_size": 2},
        "evaluate": {
            "math": ["gsm8k"],
            "general": [],
            "limit": 3,
            "generation": {"max_new_tokens": 8},
        },
    }
    path = tmp / "tiny-docker.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_small_pipeline_runs_in_the_images_and_publishes_the_run(
    engine: Any, tmp_path: Path, tiny_llama: Path, s3_server: Any, s3_bucket: str, monkeypatch
) -> None:
    from patchgap.run.execute import run_pipeline
    from patchgap.run.prepare import prepare_run

    monkeypatch.setenv("PATCHGAP_HOME", str(tmp_path / "home"))
    # A data directory with a three-item gsm8k: the run stages it in S3 for the containers.
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    shutil.copy(ASSETS / "gsm8k_mini.jsonl", tmp_path / "data" / "gsm8k" / "test.jsonl")
    monkeypatch.setenv("PATCHGAP_DATA_DIR", str(tmp_path / "data"))
    store = s3_server.store
    cfg = _config(tmp_path, tiny_llama, s3_bucket)
    lines: list[str] = []
    prepared = prepare_run(cfg, start_embedded_s3=False, say=lines.append)
    prepared.settings = prepared.settings.model_copy(update={"runner": "docker"})
    manifest = run_pipeline(prepared, say=lines.append)
    assert manifest["status"] == "succeeded"

    # pi0 reached the containers through S3, not through the host folder.
    model_uri = f"s3://{s3_bucket}/models/{tiny_llama.name}"
    assert manifest["inputs"]["model"] == model_uri
    assert store.read_manifest(model_uri) is not None
    prefix = f"s3://{s3_bucket}/runs/{prepared.run_id}"
    run = json.loads(store.get_bytes(f"{prefix}/run.json"))
    assert run["status"] == "succeeded" and run["arguments"]["sft_config"].count(model_uri) == 1
    bench = run["config"]["evaluate"]["benchmark_paths"]["gsm8k"]
    assert bench == f"s3://{s3_bucket}/benchmarks/gsm8k/test.jsonl" and store.exists(bench)
    keys = "\n".join(store.read_manifest(f"{prefix}/artifacts").files)
    for piece in ("train-rewriter", "rewrite", "gate", "sft", "evaluate", "results.json"):
        assert piece in keys, piece
