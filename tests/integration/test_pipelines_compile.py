"""Compile every pipeline and assert on the IR a cluster would receive: GPU type and count,
node selector and tolerations as parameters, S3 credentials from a Secret, retries with backoff,
the memory-backed /dev/shm, caching choices; and fail when the committed YAML is stale."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "compiled"
GPU_STAGES = ("train-rewriter", "rewrite", "gate", "sft", "evaluate")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    mp = pytest.MonkeyPatch()
    # Image references come from patchgap.kfp.images; make the compiled output independent of env.
    mp.delenv("PATCHGAP_IMAGE_REGISTRY", raising=False)
    mp.delenv("PATCHGAP_IMAGE_TAG", raising=False)
    from patchgap.pipelines.compile import compile_all

    out = tmp_path_factory.mktemp("compiled")
    try:
        paths = compile_all(out)
    finally:
        mp.undo()
    result = {}
    for p in paths:
        docs = list(yaml.safe_load_all(p.read_text()))
        assert len(docs) == 2, f"{p.name}: expected pipeline spec + platform spec"
        result[p.stem] = (docs[0], docs[1])
    return result


def _executors(spec: dict, plat: dict) -> tuple[dict, dict]:
    return (
        spec["deploymentSpec"]["executors"],
        plat["platforms"]["kubernetes"]["deploymentSpec"]["executors"],
    )


def _all_tasks(spec: dict) -> dict[str, dict]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def test_all_pipelines_compile(compiled) -> None:
    assert set(compiled) == {"full", "rewrite", "watch", "study"}


@pytest.mark.parametrize("name", ["full", "rewrite", "watch", "study"])
def test_gpu_stages_request_gpus_on_the_pool(compiled, name: str) -> None:
    spec, plat = compiled[name]
    execs, k8s = _executors(spec, plat)
    gpu_execs = [e for e in execs if e.removeprefix("exec-").rstrip("-0123456789") in GPU_STAGES]
    assert gpu_execs, name
    for e in gpu_execs:
        acc = execs[e]["container"]["resources"]["accelerator"]
        assert "accelerator_type" in acc["resourceType"], e
        assert "gpu_count" in acc["resourceCount"], e
        kc = k8s[e]
        assert kc["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"].endswith(
            "node_selector"
        )
        assert kc["tolerations"][0]["tolerationJson"]["componentInputParameter"].endswith(
            "tolerations"
        )
        (shm,) = kc["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
        assert kc["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("name", ["full", "rewrite", "watch", "study"])
def test_every_task_gets_s3_credentials_from_a_secret(compiled, name: str) -> None:
    spec, plat = compiled[name]
    execs, k8s = _executors(spec, plat)
    for e in execs:
        if e.startswith("exec-importer"):
            continue
        secrets = {s["secretName"]: s for s in k8s[e]["secretAsEnv"]}
        sec = secrets["patchgap-s3"]
        assert {k["envVar"] for k in sec["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
        # Model-loading (GPU) stages: the hub token when its Secret exists, the model cache.
        # The study report runs on the evaluate image for its libraries but loads no model.
        image = spec["deploymentSpec"]["executors"][e]["container"]["image"]
        if "patchgap-ops" in image or e.startswith("exec-study-report"):
            assert set(secrets) == {"patchgap-s3"}
            continue
        hf = secrets["patchgap-hf"]
        assert hf["optional"] and [k["envVar"] for k in hf["keyToEnv"]] == ["HF_TOKEN"]
        (pvc,) = k8s[e]["pvcMount"]
        assert pvc["mountPath"] == "/cache"


@pytest.mark.parametrize("name", ["full", "rewrite", "watch", "study"])
def test_no_secret_values_in_yaml(name: str) -> None:
    text = (COMPILED / f"{name}.yaml").read_text().lower()
    for needle in ("aws_secret_access_key:", "secret_access_key=", "password"):
        assert needle not in text


def test_retries_with_backoff_and_caching_choices(compiled) -> None:
    spec, _ = compiled["full"]
    tasks = _all_tasks(spec)
    for name, task in tasks.items():
        if "componentRef" not in task or name.startswith(("condition", "for-loop")):
            continue
        rp = task.get("retryPolicy")
        assert rp and rp["maxRetryCount"] == 3 and rp["backoffFactor"] == 2.0, name
        assert rp["backoffDuration"] == "60s"
    # The dataset URI's content may change under the same name: never cached.
    assert tasks["stage-dataset"].get("cachingOptions", {}) == {}
    assert tasks["train-rewriter"]["cachingOptions"] == {"enableCache": True}


def test_sft_is_skipped_below_the_acceptance_threshold(compiled) -> None:
    spec, _ = compiled["full"]
    conds = [
        t["triggerPolicy"]["condition"]
        for t in _all_tasks(spec).values()
        if "triggerPolicy" in t and "condition" in t["triggerPolicy"]
    ]
    assert any("gate-Output" in c and "min_acceptance_rate" in c for c in conds), conds


def test_rewrite_fans_out_over_shards(compiled) -> None:
    spec, _ = compiled["full"]
    loops = [t for n, t in _all_tasks(spec).items() if n.startswith("for-loop")]
    assert loops and "parameterIterator" in loops[0]


def test_study_trains_one_sft_per_job_and_evaluates_them_all(compiled) -> None:
    spec, _ = compiled["study"]
    tasks = _all_tasks(spec)
    loops = {n: t for n, t in tasks.items() if n.startswith("for-loop")}
    jobs = [t for t in loops.values() if "build-arms" in str(t.get("parameterIterator"))]
    assert len(jobs) == 1, loops
    sft_in = tasks["sft"]["inputs"]["parameters"]
    assert {"subset", "seed", "epochs", "label"} <= set(sft_in)
    models = tasks["evaluate"]["inputs"]["artifacts"]["models"]
    assert "sft" in str(models)  # collected from the loop
    rep = tasks["study-report"]["inputs"]["artifacts"]
    assert {"evaluation", "arms", "gate_rl", "gate_prompt", "rewriter_training"} <= set(rep)
    # Two gates: the RL rewriter's and the prompt-only one.
    assert {"gate", "gate-2"} <= set(tasks)


def test_watch_records_only_after_gate(compiled) -> None:
    spec, _ = compiled["watch"]
    tasks = _all_tasks(spec)
    rec = tasks["record-processed"]
    assert "gate" in rec.get("dependentTasks", [])
    assert tasks["find-new-datasets"].get("cachingOptions", {}) == {}


@pytest.mark.parametrize("name", ["full", "rewrite", "watch", "study"])
def test_committed_yaml_is_not_stale(compiled, name: str) -> None:
    committed = COMPILED / f"{name}.yaml"
    assert committed.is_file(), f"{committed} missing: run `make compile` and commit"
    spec, plat = compiled[name]
    old = list(yaml.safe_load_all(committed.read_text()))
    # The SDK version line differs between kfp releases; everything else must match.
    for doc in (old[0], spec):
        doc.pop("sdkVersion", None)
    assert old[0] == spec and old[1] == plat, (
        f"{committed} is stale: run `make compile` and commit the result"
    )


@pytest.mark.parametrize("name", ["full", "rewrite", "watch", "study"])
def test_s3_secret_is_optional_and_light_steps_have_resources(compiled, name: str) -> None:
    spec, plat = compiled[name]
    executors, k8s = _executors(spec, plat)
    for exec_name, cfg in k8s.items():
        for entry in cfg.get("secretAsEnv", []):
            assert entry["optional"] is True, exec_name  # IRSA / Workload Identity clusters
    for exec_name, ex in executors.items():
        if "container" not in ex:
            continue
        res = ex["container"].get("resources", {})
        assert res.get("resourceMemoryLimit"), exec_name
        if "accelerator" not in res:  # the ops steps
            assert res["resourceCpuRequest"] and res["resourceCpuLimit"], exec_name
            assert res["resourceMemoryRequest"], exec_name


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_compile_writes_the_named_pipeline_into_the_current_folder_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from patchgap.cli.main import cli
    from patchgap.pipelines.compile import compiled_dir

    monkeypatch.delenv("PATCHGAP_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("PATCHGAP_IMAGE_TAG", raising=False)
    shipped = _snapshot(compiled_dir())
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["compile", "watch"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [str(tmp_path / "watch.yaml")]
    assert [p.name for p in tmp_path.iterdir()] == ["watch.yaml"]
    assert (tmp_path / "watch.yaml").read_bytes() == (COMPILED / "watch.yaml").read_bytes()
    # The package's own compiled pipelines (what `submit watch` reads) are left alone.
    assert _snapshot(compiled_dir()) == shipped


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["compile", "wacth"],
            "pipeline 'wacth': not one of full, rewrite, watch, study; did you mean ",
        ),
        (["compile", "--out", "taken"], "--out taken: not a folder"),
    ],
)
def test_compile_refuses_an_unknown_name_or_out_as_one_line(
    args: list[str], says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from patchgap.cli.main import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file\n")
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith("error: ") and says in line, line
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
