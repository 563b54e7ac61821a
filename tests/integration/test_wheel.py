"""The built wheel is what a user installs: it holds the components, the pipelines with their
compiled YAML and the shipped configs inside the ``patchgap`` package (no generic top-level
``components`` or ``pipelines``), and `patchgap compile` from it, outside any checkout,
reproduces the committed YAML byte for byte, whatever the interpreter's hash seed, into the
current folder by default and never into the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "compiled"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy: setuptools' in-tree build/ folder would keep files deleted since.
    src = tmp_path_factory.mktemp("src") / "patchgap"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", ".patchgap", "*.egg-info", "__pycache__", ".*_cache"
    )
    shutil.copytree(ROOT, src, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
        check=True,
        timeout=600,
    )
    (path,) = out.glob("patchgap-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; its dependencies are borrowed from this test's
    environment through a .pth line (a path in a .pth file is not itself scanned for .pth
    files, so this environment's editable install of the checkout stays invisible there)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys._base_executable, "-m", "venv", str(root)], check=True, timeout=300)
    py = root / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300
    )
    return root


def test_wheel_ships_package_data_inside_patchgap(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"patchgap"}, f"top-level entries besides patchgap: {sorted(tops)}"
    for needed in (
        "patchgap/pipelines/compiled/full.yaml",
        "patchgap/pipelines/compiled/rewrite.yaml",
        "patchgap/pipelines/compiled/watch.yaml",
        "patchgap/pipelines/compiled/study.yaml",
        "patchgap/components/gate/component.py",
        "patchgap/components/study/component.py",
        "patchgap/study/arms.py",
        "patchgap/configs/study-small.yaml",
        "patchgap/configs/paper.yaml",
        "patchgap/configs/demo.yaml",
        "patchgap/configs/accelerate/zero2.yaml",
        "patchgap/data/tasks/arc_easy.yaml",
    ):
        assert needed in names, f"{needed} missing from {wheel.name}"


def test_installed_wheel_compiles_the_committed_yaml(venv: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PATCHGAP_", "PYTHON"))}
    committed = {p.name: p.read_bytes() for p in COMPILED.glob("*.yaml")}
    assert set(committed) == {"full.yaml", "rewrite.yaml", "watch.yaml", "study.yaml"}
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import patchgap; print(patchgap.__file__)"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(venv) in located, f"patchgap imported from {located.strip()}, not the wheel"
    for seed in ("1", "2"):  # two runs, two hash seeds: the same bytes
        out = tmp_path / f"out-{seed}"
        proc = subprocess.run(
            [str(venv / "bin" / "patchgap"), "compile", "--out", str(out)],
            cwd=tmp_path,
            env={**env, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for name, data in committed.items():
            assert (out / name).read_bytes() == data, f"{name} differs from the committed YAML"

    # Without --out: the current folder, whichever it is; the installed package stays as shipped.
    shipped = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", _COMPILED_DIR],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    assert str(venv) in str(shipped)
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    here = tmp_path / "here"
    here.mkdir()
    proc = subprocess.run(
        [str(venv / "bin" / "patchgap"), "compile", "watch"],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.name for p in here.iterdir()] == ["watch.yaml"]
    assert (here / "watch.yaml").read_bytes() == committed["watch.yaml"]
    assert {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before


_COMPILED_DIR = "from patchgap.pipelines.compile import compiled_dir; print(compiled_dir())"
