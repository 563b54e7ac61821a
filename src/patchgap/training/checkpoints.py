"""Training checkpoints in the object store: find the latest complete one, download it for
``resume_from_checkpoint``, and upload each new one with its manifest written last.

Layout: ``<checkpoint_uri>/checkpoint-<step>/`` holds the folder the HF Trainer wrote (adapter,
optimizer, scheduler, RNG and trainer state) plus ``patchgap_metrics.jsonl``, the per-step rows
so far. A checkpoint counts only when its manifest exists, parses, carries the same run
fingerprint and every file downloads with the right sha256; a pod killed mid-upload leaves files
without a manifest, which are ignored and later pruned.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchgap.errors import ChecksumError, ConfigError, StoreError
from patchgap.fsutil import write_text_atomic
from patchgap.storage.store import MANIFEST_NAME, Store, join_uri, parse_uri

log = logging.getLogger("patchgap.training.checkpoints")

CHECKPOINT_PREFIX = "checkpoint-"
METRICS_FILE = "patchgap_metrics.jsonl"
_STEP_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)/")
# Written after a verified download so a second process on the node (accelerate ranks) can reuse it.
_LOCAL_DONE = ".patchgap-verified"


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint in the store."""

    step: int
    uri: str
    metadata: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one training run under ``uri`` (``s3://`` prefix or local folder)."""

    def __init__(self, uri: str, fingerprint: str, store: Any | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fingerprint = fingerprint
        self.store = store if store is not None else Store.from_env()

    def step_uri(self, step: int) -> str:
        return join_uri(self.uri, f"{CHECKPOINT_PREFIX}{step}")

    def steps_present(self) -> list[int]:
        """Every step with any object under it, complete or not, ascending."""
        steps = set()
        for obj in self.store.list(self.uri):
            match = _STEP_RE.match(obj.key)
            if match:
                steps.add(int(match.group(1)))
        return sorted(steps)

    def complete(self) -> list[Checkpoint]:
        """Checkpoints whose manifest exists and parses, newest first.

        A checkpoint of another run (different fingerprint) is a :class:`ConfigError`: resuming
        from it would silently mix two trainings, so the user must pick a fresh ``checkpoint_uri``.
        """
        out = []
        for step in reversed(self.steps_present()):
            uri = self.step_uri(step)
            try:
                manifest = self.store.read_manifest(uri)
            except StoreError as err:
                log.warning("ignoring checkpoint %s: %s", uri, err)
                continue
            if manifest is None:
                log.info("ignoring incomplete checkpoint %s (no manifest)", uri)
                continue
            meta = dict(manifest.metadata or {})
            if meta.get("fingerprint") != self.fingerprint:
                raise ConfigError(
                    f"{uri}: checkpoint of a different training run (fingerprint "
                    f"{str(meta.get('fingerprint'))[:12]}..., this run "
                    f"{self.fingerprint[:12]}...); set a new checkpoint_uri or delete the old "
                    "checkpoints"
                )
            out.append(Checkpoint(step, uri, meta))
        return out

    def restore_latest(self, work_dir: Path) -> Path | None:
        """Download the newest complete, verified checkpoint into ``work_dir``; None if none.

        A checkpoint whose download fails verification is skipped for the next older one.
        """
        for ckpt in self.complete():
            dest = Path(work_dir) / f"{CHECKPOINT_PREFIX}{ckpt.step}"
            if (dest / _LOCAL_DONE).is_file():
                return dest
            try:
                self.store.download_dir(ckpt.uri, dest)
            except (ChecksumError, StoreError) as err:
                log.warning(
                    "checkpoint %s failed verification, trying an older one: %s", ckpt.uri, err
                )
                shutil.rmtree(dest, ignore_errors=True)
                continue
            write_text_atomic(dest / _LOCAL_DONE, json.dumps({"uri": ckpt.uri, "step": ckpt.step}))
            log.info("resuming from %s (step %d)", ckpt.uri, ckpt.step)
            return dest
        return None

    def upload(self, local_dir: Path, step: int, metadata: dict[str, Any] | None = None) -> str:
        """Upload one local checkpoint folder; the manifest (with the fingerprint) goes last."""
        uri = self.step_uri(step)
        meta = {**(metadata or {}), "fingerprint": self.fingerprint, "step": step}
        self.store.upload_dir(local_dir, uri, metadata=meta)
        return uri

    def prune(self, keep: int) -> list[int]:
        """Keep the ``keep`` newest complete checkpoints; delete older and abandoned ones.

        An older checkpoint loses its manifest first, so a crash mid-prune leaves it incomplete
        (ignored), never half-deleted yet trusted. Incomplete checkpoints newer than the oldest
        kept one may be an upload in progress elsewhere and are left alone.
        """
        if keep < 1:
            return []

        complete = [c.step for c in self.complete()]
        if len(complete) <= keep:
            return []
        oldest_kept = complete[keep - 1]
        removed = []
        for step in self.steps_present():
            if step >= oldest_kept:
                continue
            uri = self.step_uri(step)
            self.store.delete(join_uri(uri, MANIFEST_NAME))
            self.store.delete_prefix(uri)
            local = parse_uri(uri)
            if isinstance(local, Path):  # a local store keeps the emptied folders otherwise
                shutil.rmtree(local, ignore_errors=True)
            removed.append(step)
        return removed


def checkpoint_step(path: Path | None) -> int:
    """The optimizer step a restored checkpoint folder holds (0 without one): the trainer's
    own record, else the step in the folder's name."""
    if path is None:
        return 0
    state = path / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text()).get("global_step", 0))
    return int(path.name.rsplit("-", 1)[-1])
