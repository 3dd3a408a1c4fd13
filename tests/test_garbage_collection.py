"""`--gc_every_steps`: automatic collection off while training, young generations collected on the schedule, the
collector handed back; bad values refused before anything loads."""

import gc
from types import SimpleNamespace

import pytest

from ghostvis_hf.training import GarbageCollectionCallback, GhostVisArguments, gc_callbacks


def test_collects_on_schedule_and_restores_the_collector(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    callback = GarbageCollectionCallback(every_steps=3)
    was_enabled = gc.isenabled()
    gc.enable()
    try:
        callback.on_train_begin(None, None, None)
        assert not gc.isenabled() and calls == [2]  # one full collection of what set-up left, then off
        for step in range(1, 10):
            callback.on_step_end(None, SimpleNamespace(global_step=step), None)
        assert calls == [2, 1, 1, 1]  # steps 3, 6, 9: the young generations only
        callback.on_train_end(None, None, None)
        assert gc.isenabled()
    finally:
        gc.enable() if was_enabled else gc.disable()


def test_a_collector_that_was_off_stays_off():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        callback = GarbageCollectionCallback(every_steps=5)
        callback.on_train_begin(None, None, None)
        callback.on_train_end(None, None, None)
        assert not gc.isenabled()
    finally:
        gc.enable() if was_enabled else gc.disable()


def test_zero_means_automatic_collection_and_negatives_are_refused():
    assert gc_callbacks(0) == []
    assert isinstance(gc_callbacks(50)[0], GarbageCollectionCallback)
    with pytest.raises(ValueError, match="gc_every_steps must be >= 0"):
        gc_callbacks(-1)
    with pytest.raises(ValueError, match="gc_every_steps must be >= 0"):
        GhostVisArguments(gc_every_steps=-5)
    with pytest.raises(ValueError, match="every_steps must be >= 1"):
        GarbageCollectionCallback(every_steps=0)
