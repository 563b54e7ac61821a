"""Run one stage the way a container does (``python -m patchgap.stages.<name>``), and SIGKILL
it on its Nth write to the store, or on the write of an output's manifest.

    python harness.py KILL STAGE [stage arguments...]

KILL is ``0`` (never), a write number (1-based, counting every ``put_file``, ``put_bytes`` and
``put_bytes_if``, the conditional write that publishes an S3 output's manifest),
``manifest`` (the first write of a ``_manifest.json``: every object of that output is written,
its manifest is not) or ``manifest:URI`` (the manifest of the output at ``URI``, when earlier
manifests, such as training checkpoints', come first). The kill is a real SIGKILL: no
``finally`` blocks, no flushes. With ``FAULTS_WRITE_LOG`` set, the URI of every write is appended
to that file before it happens, so a test knows where the kill points lie.

train_rewriter scores rewrites with :class:`FixedScorer` instead of pi0: a random tiny model
never reaches an answer, every reward would be 0, and nothing would train.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import sys
import threading


class FixedScorer:
    """The paper's group reward over made-up measurements that depend only on each rewrite's
    text: every other member of a group passes the gate, NLL and embeddings come from a hash.
    Deterministic, so an interrupted training and an uninterrupted one see the same rewards."""

    def score_groups(self, questions, answers, groups, reference_solutions=None):  # type: ignore[no-untyped-def]
        import numpy as np

        from patchgap.reward.rewards import group_rewards

        out = []
        for group in groups:
            seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in group]
            emb = np.array([np.random.default_rng(s).normal(size=8) for s in seeds])
            nll = [1.0 + (s % 97) / 10 for s in seeds]
            passed = [i % 2 == 0 for i in range(len(group))]
            out.append(group_rewards(passed, None, nll, emb))
        return out


def main() -> int:
    kill, stage_name, *args = sys.argv[1:]
    from patchgap.stages.base import main as stage_main
    from patchgap.storage.store import MANIFEST_NAME, Store

    writes = 0
    lock = threading.Lock()  # uploads put a folder's files from several threads
    log = os.environ.get("FAULTS_WRITE_LOG")
    target = kill.removeprefix("manifest:").rstrip("/") + "/" + MANIFEST_NAME

    def hooked(method):
        def write(self, first, uri, *rest):
            nonlocal writes
            with lock:
                writes += 1
                if log:
                    with open(log, "a", encoding="utf-8") as fh:
                        fh.write(f"{uri}\n")
                is_manifest = str(uri).endswith(MANIFEST_NAME)
                if (
                    (kill == "manifest" and is_manifest)
                    or (kill.startswith("manifest:") and str(uri) == target)
                    or (kill.isdigit() and writes == int(kill))
                ):
                    os.kill(os.getpid(), signal.SIGKILL)
            return method(self, first, uri, *rest)

        return write

    Store.put_file = hooked(Store.put_file)
    Store.put_bytes = hooked(Store.put_bytes)
    Store.put_bytes_if = hooked(Store.put_bytes_if)
    stage = importlib.import_module(f"patchgap.stages.{stage_name}")
    if stage_name == "train_rewriter":
        stage._build_scorer = lambda config, model_src, device: FixedScorer()
    return stage_main(stage, args)


if __name__ == "__main__":
    raise SystemExit(main())
