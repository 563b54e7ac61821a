"""Probes for the distributed test tier, loaded by every Python process of a run through
PYTHONPATH (tests/distributed/hooks) when ``PATCHGAP_DIST_PROBE`` names a folder; inert otherwise.

In each process (``rank<RANK>`` under torchrun/accelerate, ``main`` elsewhere) it records into
that folder:

- ``env-<role>-<pid>.json``: the launcher's rank variables;
- ``writes-<role>.jsonl`` (ranks; ``main`` too with ``PATCHGAP_DIST_MAIN_TRAINS=1``): every
  file the process opens for writing, every safetensors/torch save and every store upload, so a
  test can tell which rank wrote the outputs;
- ``groups-<role>.jsonl`` (with ``PATCHGAP_DIST_FAKE_MEASURES=1``): each group the reward scored,
  with the step, the prompt ids, the rewrites and the rewards. The reward is the project's group
  reward (patchgap.reward.rewards.group_rewards) on measurements derived from the rewrites' text,
  as tests/integration/test_stage_train_rewriter.py's FakeScorer does: a tiny random model never
  passes the real answer check, so real measurements would give every group the same reward;

and with ``PATCHGAP_DIST_KILL=<rank>:<step>`` that rank SIGKILLs itself as step+1 begins, once
``checkpoint-<step>`` is complete in the store under ``PATCHGAP_DIST_CHECKPOINTS``.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

_PROBE = os.environ.get("PATCHGAP_DIST_PROBE")
_ROLE = f"rank{os.environ['RANK']}" if "RANK" in os.environ else "main"
_ATTEMPT = os.environ.get("PATCHGAP_DIST_ATTEMPT", "1")
_real_open = builtins.open
_step = {"now": -1}


def _record(name: str, row: dict[str, Any]) -> None:
    assert _PROBE is not None
    with _real_open(Path(_PROBE) / f"{name}-{_ROLE}.jsonl", "a") as fh:
        fh.write(json.dumps({"attempt": _ATTEMPT, "pid": os.getpid(), **row}) + "\n")


def _wrap_open(real: Any) -> Any:
    def opened(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            _record("writes", {"how": "open", "path": os.path.abspath(os.fspath(file))})
        return real(file, mode, *args, **kwargs)

    return opened


def _audit_writes() -> None:
    builtins.open = _wrap_open(_real_open)
    io.open = builtins.open
    import safetensors.torch
    import torch

    from patchgap.storage.store import Store

    def wrap(owner: Any, attr: str, how: str, arg: int) -> None:
        real = getattr(owner, attr)

        def logged(*args: Any, **kwargs: Any) -> Any:
            target = args[arg] if len(args) > arg else kwargs.get("filename", kwargs.get("f"))
            if isinstance(target, (str, os.PathLike)):
                _record("writes", {"how": how, "path": os.path.abspath(os.fspath(target))})
            return real(*args, **kwargs)

        setattr(owner, attr, logged)

    wrap(safetensors.torch, "save_file", "safetensors", 1)
    wrap(torch, "save", "torch.save", 1)
    real_upload = Store.upload_dir

    def upload_dir(self: Any, local: Any, uri: str, *args: Any, **kwargs: Any) -> Any:
        _record("writes", {"how": "upload", "path": str(uri)})
        return real_upload(self, local, uri, *args, **kwargs)

    Store.upload_dir = upload_dir  # type: ignore[method-assign]


def _measured_groups() -> None:
    """Scorer measurements from the rewrites' text (see the module docstring)."""
    import numpy as np

    from patchgap.reward.rewards import group_rewards
    from patchgap.reward.scoring import GroupRewardScorer
    from patchgap.reward.trl_adapter import GroupRewardFunction

    def score_groups(self: Any, questions, answers, groups, reference_solutions=None):  # type: ignore[no-untyped-def]
        out = []
        for g in groups:
            seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in g]
            emb = np.array([np.random.default_rng(s).normal(size=8) for s in seeds])
            nll = [1.0 + (s % 97) / 10 for s in seeds]
            out.append(group_rewards([i % 2 == 0 for i in range(len(g))], None, nll, emb))
        _record(
            "groups",
            {
                "step": _step["now"],
                "groups": [
                    {"question": q, "rewrites": list(g), "rewards": [t.total for t in terms]}
                    for q, g, terms in zip(questions, groups, out, strict=True)
                ],
            },
        )
        return out

    GroupRewardScorer.load = lambda self: self  # type: ignore[method-assign]
    GroupRewardScorer.score_groups = score_groups  # type: ignore[method-assign]
    GroupRewardScorer.metrics = lambda self: {}  # type: ignore[method-assign]
    real_call = GroupRewardFunction.__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = kwargs.get("trainer_state")
        _step["now"] = int(state.global_step) if state is not None else -1
        return real_call(self, *args, **kwargs)

    GroupRewardFunction.__call__ = call  # type: ignore[method-assign]


def _kill_after_checkpoint(rank: str, step: int) -> None:
    from transformers.trainer_callback import CallbackHandler

    from patchgap.storage.store import Store

    real = CallbackHandler.on_step_begin

    def on_step_begin(self: Any, args: Any, state: Any, control: Any) -> Any:
        if os.environ.get("RANK") == rank and state.global_step >= step:
            prefix = os.environ["PATCHGAP_DIST_CHECKPOINTS"]
            marker = f"checkpoint-{step}/_manifest.json"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if any(o.key.endswith(marker) for o in Store.from_env().list(prefix)):
                    break
                time.sleep(0.2)
            _record("killed", {"step": state.global_step})
            os.kill(os.getpid(), signal.SIGKILL)  # a lost node: no clean-up at all
        return real(self, args, state, control)

    CallbackHandler.on_step_begin = on_step_begin  # type: ignore[method-assign]


if _PROBE:
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: os.environ.get(k) for k in keys}
    with _real_open(Path(_PROBE) / f"env-{_ROLE}-{os.getpid()}.json", "w") as fh:
        json.dump(env, fh)
    if _ROLE != "main" or os.environ.get("PATCHGAP_DIST_MAIN_TRAINS") == "1":
        _audit_writes()
    if os.environ.get("PATCHGAP_DIST_FAKE_MEASURES") == "1" and (
        _ROLE != "main" or os.environ.get("PATCHGAP_DIST_MAIN_TRAINS") == "1"
    ):
        _measured_groups()
    kill = os.environ.get("PATCHGAP_DIST_KILL")
    if kill and "RANK" in os.environ:
        kill_rank, kill_step = kill.split(":")
        _kill_after_checkpoint(kill_rank, int(kill_step))
