"""Process-wide locations: the data directory, the cache directory, the state directory.

Each comes from an environment variable with a sensible default, so containers, CI and laptops
agree without any config file.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "PATCHGAP_DATA_DIR"
CACHE_DIR_ENV = "PATCHGAP_CACHE_DIR"
HOME_ENV = "PATCHGAP_HOME"
HUB_DIR_ENV = "PATCHGAP_HUB_DIR"


def project_root() -> Path | None:
    """The source checkout this package runs from, if any (editable installs)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "src" / "patchgap").is_dir():
            return parent
    return None


def configs_dir() -> Path:
    """The shipped run and accelerate configs: ``configs/`` of a checkout, else the copy that
    the wheel installs as package data (``patchgap/configs``)."""
    root = project_root()
    if root is not None:
        return root / "configs"
    return Path(__file__).resolve().parent / "configs"


def data_dir() -> Path | None:
    """The folder laid out like the project's shared data (gsm8k/, math500/, arc/, ...).

    ``PATCHGAP_DATA_DIR`` wins; otherwise ``../shared/data`` beside the checkout when it exists.
    ``None`` means named sets fall back to the hub.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    root = project_root()
    if root is not None:
        candidate = root.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def hub_dir() -> Path | None:
    """A folder of local dataset repositories laid out as ``<owner>/<name>/`` (clones of hub
    repos: data files and the README dataset card), from ``PATCHGAP_HUB_DIR``; ``hf://`` sources
    found there load from it, for clusters without internet."""
    env = os.environ.get(HUB_DIR_ENV)
    return Path(env).expanduser() if env else None


def home_dir() -> Path:
    """Local state: the embedded S3 server's data, credentials and PID file."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser()
    root = project_root()
    if root is not None:
        return root / ".patchgap"
    return Path.home() / ".patchgap"


def cache_dir() -> Path:
    """Converted models and other derived, re-creatable files."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "patchgap"
