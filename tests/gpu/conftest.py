"""The GPU tier's shared set-up: the CUDA device with its timing and memory helpers, the tiny
local embedder, the questions the checks score, and the figures each check measures.

Every test here is marked ``gpu``; tests/conftest.py skips them without CUDA. The figures a test
records are printed in a "GPU figures" section at the end of the run, attached to the test as a
``figures`` property (JUnit XML), and, with ``PATCHGAP_GPU_REPORT=path.json``, written to that file
after every test (so a run cut short still leaves what it measured) with the device, the library
versions and each test's outcome.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from patchgap.lm.models import clear_shared_models

REPORT_ENV = "PATCHGAP_GPU_REPORT"

VERSIONS = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "sentence-transformers",
    "huggingface-hub",
    "tokenizers",
    "pydantic",
    "typing-extensions",
    "math-verify",
    "numpy",
    "pandas",
    "pyarrow",
    "vllm",
)

QUESTIONS = [
    "What is 7 + 5?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Solve for y: 2y - 7 = 9.",
    "A rectangle has length 8 and width 3. What is its perimeter?",
]
ANSWERS = [
    "The answer is \\boxed{12}.",
    "Natalia sold 48 / 2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips. #### 72",
    "Adding 7 gives 2y = 16, so y = 8. Let me think step by step. First, we find the total. "
    "Then we divide by the number of people. So the final answer is \\boxed{8}.",
    "2(8 + 3) = 22",
]


@dataclass
class Cuda:
    """The device the checks run on, with what timing and peak memory need on it."""

    name: str
    gpu: str

    def sync(self) -> None:
        """Wait for queued kernels, so a wall-clock interval covers the work it times."""
        torch.cuda.synchronize()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)


@dataclass
class Figures:
    """What one check measured: values for the report, lines for the terminal."""

    values: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def add(self, **values: Any) -> None:
        self.values.update(values)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line)


@dataclass
class _Run:
    """The session's figures and outcomes, keyed by test id, and the device they came from."""

    device: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


_RUN = pytest.StashKey[_Run]()


def _run(config: pytest.Config) -> _Run:
    if _RUN not in config.stash:
        config.stash[_RUN] = _Run()
    return config.stash[_RUN]


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _save(config: pytest.Config) -> None:
    path = os.environ.get(REPORT_ENV)
    run = _run(config)
    if not path or not run.checks:
        return
    report = {
        **run.device,
        "seconds": round(time.perf_counter() - run.started, 1),
        "checks": run.checks,
        "all_passed": all(c.get("outcome") in ("passed", "skipped") for c in run.checks.values()),
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")


@pytest.fixture(scope="session")
def cuda(pytestconfig: pytest.Config) -> Cuda:
    """The CUDA device, initialised once (its start-up is not counted in any check's time)."""
    if not torch.cuda.is_available():  # tests/conftest.py skips first; this guards a direct use
        pytest.skip("needs a CUDA GPU")
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    torch.zeros(1, device="cuda")
    device = Cuda(name="cuda", gpu=torch.cuda.get_device_name(0))
    _run(pytestconfig).device = {
        "device": device.name,
        "gpu": device.gpu,
        "cuda_init_seconds": round(time.perf_counter() - t0, 2),
        "versions": _versions(),
    }
    return device


@pytest.fixture(autouse=True)
def _own_home_and_free_memory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each check keeps its state under its own folder and leaves the GPU memory it took free
    for the next one (models shared through the cache included)."""
    monkeypatch.setenv("PATCHGAP_HOME", str(tmp_path / "home"))
    yield
    clear_shared_models()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def figures(request: pytest.FixtureRequest, record_property: Any) -> Iterator[Figures]:
    """Where a check puts its figures; they are kept when the check fails, as its evidence."""
    found = Figures()
    t0 = time.perf_counter()
    yield found
    entry = _run(request.config).checks.setdefault(request.node.nodeid, {})
    entry.update(found.values)
    entry["lines"] = found.lines
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    record_property("figures", json.dumps(found.values, default=str))
    _save(request.config)


@pytest.fixture(scope="session")
def math_qa() -> tuple[list[str], list[str]]:
    """Four math questions and four answers of different styles (boxed, ####, chatty, bare)."""
    return QUESTIONS, ANSWERS


@pytest.fixture(scope="session")
def embedder(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sentence-transformers folder (the tiny Llama, mean of its last states)."""
    from sentence_transformers import SentenceTransformer  # heavy; only when a check needs it

    folder = tmp_path_factory.mktemp("embedder") / "embedder"
    SentenceTransformer(str(tiny_llama), device="cpu").save(str(folder))
    return folder


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Each check's outcome beside its figures (a failed set-up or teardown counts too)."""
    report = yield
    if report.when == "call" or report.outcome != "passed":
        checks = _run(item.config).checks
        if report.outcome != "skipped" or item.nodeid in checks:
            entry = checks.setdefault(item.nodeid, {})
            entry["outcome"] = report.outcome
            if report.outcome == "failed":
                entry["reason"] = str(call.excinfo.value)[:500] if call.excinfo else ""
            _save(item.config)
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The figures every check measured, after the pass/fail summary."""
    run = _run(config)
    if not any(c.get("lines") for c in run.checks.values()):
        return
    terminalreporter.section("GPU figures")
    dev = run.device
    if dev:
        versions = ", ".join(f"{k} {v}" for k, v in dev["versions"].items() if v)
        terminalreporter.write_line(f"device {dev['device']} ({dev['gpu']}), {versions}")
    for nodeid, entry in run.checks.items():
        terminalreporter.write_line(f"{entry.get('outcome', '?').upper()} {nodeid}")
        for line in entry.get("lines", []):
            terminalreporter.write_line(f"  {line}")
    if os.environ.get(REPORT_ENV):
        terminalreporter.write_line(f"figures in {os.environ[REPORT_ENV]}")
