"""`--sync_steps START:STOP`: the host<->GPU syncs of a window of optimizer steps, by call stack (torch's sync debug
mode warns at each; CUDA only, so here the mode switch is stood in for and the warnings are raised by hand)."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from ghostvis_hf.training.sync_report import SyncReportCallback, sync_report_callbacks


def read_back_the_loss():  # stands in for an op that syncs: torch warns from the calling frame
    warnings.warn("called a synchronizing CUDA operation", UserWarning)


def test_the_window_counts_each_sync_by_its_stack(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    shown_before = warnings.showwarning
    callback = SyncReportCallback(3, 5, str(tmp_path))
    args = SimpleNamespace(process_index=0)
    callback.on_step_begin(args, SimpleNamespace(global_step=2), None)
    with pytest.warns(UserWarning):  # before the window: shown as usual, not counted
        read_back_the_loss()
    for step in (3, 4):
        callback.on_step_begin(args, SimpleNamespace(global_step=step), None)
        for _ in range(2):  # one call site: one stack
            read_back_the_loss()
        with pytest.warns(FutureWarning):  # not a sync: shown as usual
            warnings.warn("something else", FutureWarning)
        callback.on_step_end(args, SimpleNamespace(global_step=step + 1), None)
    text = (tmp_path / "syncs_rank0.txt").read_text()
    assert text.startswith("4 syncs in 2 optimizer steps (2.0 a step), steps 3-4")
    assert "2.0 a step (4 in all) at\n    tests/test_sync_report.py:" in text and "read_back_the_loss" in text
    assert modes == ["warn", "default"] and warnings.showwarning is shown_before


def test_window_argument():
    assert sync_report_callbacks(None, "out") == []
    with pytest.raises(ValueError, match="sync_steps must be START:STOP"):
        sync_report_callbacks("3-5", "out")
