"""The watch pipeline's ledger never processes a dataset twice and never records a failed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchgap.data.ledger import Ledger, find_datasets
from patchgap.errors import PatchgapError
from patchgap.storage.store import Store


def _write(folder: Path, name: str, text: str) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    d = tmp_path / "inbox"
    _write(d, "a.jsonl", '{"question": "q1", "answer": "#### 1"}\n')
    _write(d, "b.parquet.jsonl", '{"question": "q2", "answer": "#### 2"}\n')
    _write(d, "copy-of-a.jsonl", '{"question": "q1", "answer": "#### 1"}\n')
    _write(d, "notes.txt", "not a dataset")
    _write(d, "_manifest.json", "{}")
    return d


def _process(ledger: Ledger, objs, fail: set[str] = frozenset()) -> list[str]:
    """What the watch pipeline does: run each pending dataset; record only successes."""
    done = []
    for obj in ledger.pending(objs):
        if obj.uri.rsplit("/", 1)[-1] in fail:
            continue  # the rewrite run failed: nothing is recorded
        ledger.record(obj, run_id="r")
        done.append(obj.uri.rsplit("/", 1)[-1])
    return done


def test_find_datasets_skips_non_datasets_and_manifests(inbox: Path) -> None:
    found = find_datasets(Store(), str(inbox))
    names = [o.uri.rsplit("/", 1)[-1] for o in found]
    assert names == ["a.jsonl", "b.parquet.jsonl", "copy-of-a.jsonl"]
    assert found[0].sha256 == found[2].sha256  # same bytes, same content hash


def test_never_processes_a_dataset_twice(inbox: Path, tmp_path: Path) -> None:
    store = Store()
    ledger = Ledger(store, str(tmp_path / "ledger"))
    first = _process(ledger, find_datasets(store, str(inbox)))
    # The copy has the same content hash as a.jsonl: processed once.
    assert first == ["a.jsonl", "b.parquet.jsonl"]
    assert _process(ledger, find_datasets(store, str(inbox))) == []
    _write(inbox, "c.jsonl", '{"question": "q3", "answer": "#### 3"}\n')
    assert _process(ledger, find_datasets(store, str(inbox))) == ["c.jsonl"]


def test_failed_dataset_is_not_recorded_and_retried_next_time(inbox: Path, tmp_path: Path) -> None:
    store = Store()
    ledger = Ledger(store, str(tmp_path / "ledger"))
    assert _process(ledger, find_datasets(store, str(inbox)), fail={"b.parquet.jsonl"}) == [
        "a.jsonl"
    ]
    objs = find_datasets(store, str(inbox))
    b = next(o for o in objs if o.uri.endswith("b.parquet.jsonl"))
    assert not ledger.is_processed(b.sha256)
    assert _process(ledger, objs) == ["b.parquet.jsonl"]
    entry = ledger.entry(b.sha256)
    assert entry is not None and entry["uri"] == b.uri and entry["run_id"] == "r"


def test_bad_hash_is_refused(tmp_path: Path) -> None:
    ledger = Ledger(Store(), str(tmp_path / "ledger"))
    with pytest.raises(PatchgapError, match="sha256"):
        ledger.is_processed("../../etc/passwd")


def test_two_runs_claim_each_new_dataset_once(inbox: Path, tmp_path: Path) -> None:
    store = Store()
    first, second = (Ledger(store, str(tmp_path / "ledger")) for _ in range(2))
    objs = find_datasets(store, str(inbox))
    mine = first.claim_pending(objs, lease_seconds=3600)
    assert [o.uri.rsplit("/", 1)[-1] for o in mine] == ["a.jsonl", "b.parquet.jsonl"]
    assert second.claim_pending(objs, lease_seconds=3600) == []  # the overlapping run skips
    # A run that died holding its claims blocks them only until the lease ends.
    assert first.claim(mine[0], lease_seconds=-1, owner="dead") is False  # still live
    first.release(mine[0].sha256)
    assert first.claim(mine[0], lease_seconds=-1, owner="dead")  # now held, already expired
    assert second.claim(mine[0], lease_seconds=3600)
    # Once recorded, nobody claims it again.
    second.record(mine[0], run_id="r2")
    second.release(mine[0].sha256)
    assert first.claim_pending(objs, lease_seconds=3600) == []


def test_hashes_are_cached_by_etag_and_size(
    inbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import patchgap.data.ledger as ledger_mod

    store = Store()
    ledger = Ledger(store, str(tmp_path / "ledger"))
    hashed: list[str] = []
    real = ledger_mod.content_sha256

    def counting(store: Store, uri: str) -> str:
        hashed.append(uri.rsplit("/", 1)[-1])
        return real(store, uri)

    monkeypatch.setattr(ledger_mod, "content_sha256", counting)
    first = find_datasets(store, str(inbox), cache_uri=ledger.hash_cache_uri())
    assert len(hashed) == 3
    assert find_datasets(store, str(inbox), cache_uri=ledger.hash_cache_uri()) == first
    assert len(hashed) == 3  # nothing downloaded again
    _write(inbox, "a.jsonl", '{"question": "q1 changed", "answer": "#### 1"}\n')
    again = find_datasets(store, str(inbox), cache_uri=ledger.hash_cache_uri())
    assert hashed[3:] == ["a.jsonl"] and again[0].sha256 != first[0].sha256
    # A damaged cache is rebuilt, not fatal.
    store.put_bytes(b"{not json", ledger.hash_cache_uri())
    assert find_datasets(store, str(inbox), cache_uri=ledger.hash_cache_uri()) == again
