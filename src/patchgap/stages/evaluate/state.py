"""The evaluate stage's resume store: finished (model, benchmark) results kept under the run's
fingerprint, so a restarted evaluation runs only what is missing."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from patchgap.stages import resume
from patchgap.stages.evaluate.config import NAME, Config
from patchgap.stages.evaluate.items import ItemResult
from patchgap.stages.resume import LeftOut, StageState

#: Settings that change no (model, benchmark) result: the table's and where state goes.
NOT_IN_FINGERPRINT = LeftOut.of(
    "model",
    "models",
    "base",
    "baseline",
    "rewritten",
    "gold_logprob",
    "bootstrap_reps",
    "near_zero",
    "state_uri",
)


def fingerprint(config: Config) -> str:
    """What identifies the kept results: every setting that changes one."""
    return resume.fingerprint(config, NOT_IN_FINGERPRINT, length=16)


class EvalState(StageState):
    """Finished (model, benchmark) results under ``<state_uri>/<fingerprint>/<model hash>/``,
    one object per benchmark, so a restarted evaluation only runs what is missing."""

    stage = NAME

    def _key(self, model: str, bench: str) -> str:
        return f"{model}/{bench}.json"

    def load(self, model: str, bench: str) -> dict[str, Any] | None:
        """The saved result, or None when absent or unreadable (then it is recomputed)."""
        return self.load_rows(model, bench, lambda rows: [ItemResult(**row) for row in rows])

    def load_rows(
        self,
        model: str,
        name: str,
        convert: Callable[[list[dict[str, Any]]], Any] | None = None,
    ) -> dict[str, Any] | None:
        """A saved ``{"items": [...], ...}`` body (items through ``convert``), or None when
        absent or unreadable."""

        def body(blob: bytes) -> dict[str, Any]:
            data = json.loads(blob)
            if not isinstance(data.get("items"), list):
                raise ValueError("no items")
            if convert is not None:
                data["items"] = convert(data["items"])
            return data

        return self.read_unit(self._key(model, name), body)

    def save(self, model: str, bench: str, items: Sequence[ItemResult], **extra: Any) -> None:
        self.save_rows(model, bench, [r.as_dict() for r in items], **extra)

    def save_rows(
        self, model: str, name: str, rows: Sequence[Mapping[str, Any]], **extra: Any
    ) -> None:
        body = {"items": list(rows), **extra}
        blob = json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
        self.write_unit(self._key(model, name), blob)
