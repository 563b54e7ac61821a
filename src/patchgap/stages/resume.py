"""Resume after a crash, for every resumable stage: the run fingerprint that names kept work,
the one declaration of the config fields it leaves out, and the state of finished units that a
restart skips.

A fingerprint is the sha256 of a stage's config without its :class:`LeftOut` fields (how, where
or how long it runs, never what it computes), plus the identities of its inputs. Kept work sits
under ``<root>/<fingerprint>/``: train-rewriter and sft keep trainer checkpoints there
(:mod:`patchgap.training.checkpoints`), rewrite and evaluate keep finished units in a
:class:`StageState`. Fingerprints must not change from one release to the next for the same
config and inputs, or users' kept state and checkpoints are no longer found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from pydantic import BaseModel

from patchgap.errors import StoreError
from patchgap.stages.base import after_outputs_kept
from patchgap.storage.store import Store, join_uri

log = logging.getLogger("patchgap.stages.resume")

#: Where a stage keeps its state when ``state_uri`` is unset and its output is local.
STATE_FOLDER = "_state"

T = TypeVar("T")

# What a unit that cannot be parsed raises; it is redone rather than blocking every restart.
_CORRUPT = (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, RecursionError)


@dataclass(frozen=True)
class LeftOut:
    """The config fields a stage's fingerprint leaves out: they may change between a run and
    its restart without making the kept work foreign.

    ``fields`` are top-level fields, ``sub_fields`` fields of a nested section, and
    ``while_off`` switches left out while false, so work kept before such a switch existed is
    still found when it is off. ``name in left_out`` asks about a whole top-level field.
    """

    fields: frozenset[str]
    sub_fields: Mapping[str, frozenset[str]] = field(default_factory=dict)
    while_off: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls,
        *fields: str,
        while_off: Collection[str] = (),
        **sub_fields: Collection[str],
    ) -> LeftOut:
        """``LeftOut.of("progress", generation={"device"})``."""
        nested = {name: frozenset(names) for name, names in sub_fields.items()}
        return cls(frozenset(fields), nested, frozenset(while_off))

    def __contains__(self, name: object) -> bool:
        return name in self.fields

    def settings(self, config: BaseModel) -> dict[str, Any]:
        """``config`` as JSON-ready data, without the fields left out."""
        exclude: dict[str, Any] = {name: True for name in self.fields}
        exclude.update({name: set(names) for name, names in self.sub_fields.items()})
        data = config.model_dump(mode="json", exclude=exclude)
        for name in self.while_off:
            if not data.get(name):
                data.pop(name, None)
        return data


def fingerprint(
    config: BaseModel,
    left_out: LeftOut,
    inputs: Mapping[str, Any] | None = None,
    length: int = 64,
) -> str:
    """The sha256 hex (its first ``length`` digits) of ``config`` without ``left_out``.

    With ``inputs`` (the identities of the data, adapter, ... a run reads, and any format
    number), the hash covers ``{"config": settings, **inputs}``; without, the settings alone.
    Those two shapes are what the stages have always hashed, so kept work stays found.
    """
    settings = left_out.settings(config)
    body = settings if inputs is None else {"config": settings, **inputs}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:length]


class StageState:
    """Finished units of a stage's work, one object each under ``<root>/<fingerprint>/...``.

    The root is ``state_uri`` (an ``s3://`` prefix, which the runner sets beside an ``s3://``
    output, or a folder) or else a ``_state`` folder inside the local output. A unit is written
    in one put, so a crash leaves it whole or absent; one that does not parse is redone.
    """

    #: The stage's name and what it does with a corrupt unit, for the warning.
    stage: ClassVar[str] = "stage"
    redo: ClassVar[str] = "recomputing"

    def __init__(self, root: str, fingerprint: str, *parts: str) -> None:
        self.store = Store.from_env() if root.startswith("s3://") else Store()
        self.prefix = join_uri(root, fingerprint, *parts)
        # Set by open() when the state lives inside the output folder.
        self.in_output: Path | None = None

    @classmethod
    def open(cls, state_uri: str | None, output: Path, *args: Any) -> Self:
        """The state at ``state_uri``, or in ``output``'s ``_state`` folder when unset;
        ``args`` go on to the constructor after the root."""
        if state_uri is not None:
            return cls(state_uri, *args)
        state = cls(str(Path(output) / STATE_FOLDER), *args)
        state.in_output = Path(output) / STATE_FOLDER
        return state

    def unit_uri(self, *unit: str) -> str:
        return join_uri(self.prefix, *unit)

    def kept(self) -> set[str]:
        """The keys (relative to the prefix) of every unit kept so far."""
        return {o.key for o in self.store.list(self.prefix)}

    def read_unit(
        self, unit: str, parse: Callable[[bytes], T], why: str = "is corrupt"
    ) -> T | None:
        """The unit at ``unit`` (a key under the prefix) through ``parse``; None when absent,
        unreadable, or refused by ``parse`` (then it is redone)."""
        uri = self.unit_uri(unit)
        try:
            blob = self.store.get_bytes(uri)
        except StoreError:
            return None
        try:
            return parse(blob)
        except _CORRUPT:
            log.warning("%s: state %s %s; %s", self.stage, uri, why, self.redo)
            return None

    def write_unit(self, unit: str, blob: bytes) -> None:
        """Keep one finished unit (a single put: whole or absent after a crash)."""
        self.store.put_bytes(blob, self.unit_uri(unit))

    def clear(self) -> None:
        """Remove every unit of this state."""
        self.store.delete_prefix(self.prefix)

    def discard(self) -> None:
        """The outputs are complete: the kept units would only duplicate them (and pile up,
        one folder per fingerprint)."""
        if self.in_output is not None:
            # Inside the output folder: it must go before the output is uploaded.
            shutil.rmtree(self.in_output, ignore_errors=True)
        else:
            # In the store: only once the outputs' manifests are written.
            after_outputs_kept(self.clear)


def run_folder(root: str, fingerprint: str) -> str:
    """Where a training run keeps its checkpoints under ``checkpoint_uri``: one folder per run
    fingerprint, so a changed config starts fresh beside the old run instead of resuming from
    checkpoints that belong to other settings."""
    return join_uri(root, fingerprint[:16])
