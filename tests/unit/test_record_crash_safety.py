"""A kill -9 or a full disk at any moment never loses a run's logs or leaves a run that cannot resume or be
diagnosed: metrics.jsonl and routing/ (events.jsonl, header.json, summary.json, the .bin files) are cut in
place or replaced atomically, and what a kill can leave (a torn last line, a partial row, an empty header
from an older moedit's in-place write) is read around or rebuilt. A kill is simulated by a write that
stops half-way and raises (deterministic); the file must hold the old or the new content, never a mix."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import sys
import types

import numpy as np
import pytest

from moedit.config import ConfigError
from moedit.diagnostics import record as rec
from moedit.diagnostics.report import write_report
from moedit.train.metrics import MetricsWriter, read_metrics
from moedit.utils.files import PathError

from test_diagnostics import header, random_records, token_rows


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the write runs (it is not an Exception, so nothing catches it)."""


def patch_writes(monkeypatch) -> None:
    """Every Path.write_text / write_bytes writes the first half of its data, then the process 'dies'."""
    def write(self, data, *args, **kwargs):
        with open(self, "w" if isinstance(data, str) else "wb") as f:
            f.write(data[: len(data) // 2])
        raise Killed(str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", write)
    monkeypatch.setattr(pathlib.Path, "write_bytes", write)


@pytest.fixture
def kill_mid_write(monkeypatch):
    patch_writes(monkeypatch)


def rows_text(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def steps_of(rows) -> list[int]:
    return [r["step"] for r in rows]


# ----------------------------------------------------------------------------- metrics.jsonl


def test_metrics_kill_while_resuming_keeps_the_history(tmp_path, kill_mid_write):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write(rows_text([2, 4, 6, 8]) + '{"step": 10, "lo')  # a crash cut the last line short
    try:
        MetricsWriter(tmp_path, start_step=4)
    except Killed:
        pass
    assert steps_of(read_metrics(path)) in ([2, 4], [2, 4, 6, 8])  # cut to step 4, or untouched


def test_metrics_rewrite_of_out_of_order_rows_is_atomic(tmp_path, kill_mid_write):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write(rows_text([2, 6, 4]))  # not a prefix: only a rewrite can keep 2 and 4
    with pytest.raises(Killed):
        MetricsWriter(tmp_path, start_step=4)
    assert steps_of(read_metrics(path)) == [2, 6, 4]  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_metrics_reader_drops_a_torn_last_line_and_writer_continues_on_a_clean_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write(rows_text([2, 4]) + '{"step": 6, "lo')
    assert steps_of(read_metrics(path)) == [2, 4]
    with open(path, "w") as f:
        f.write(rows_text([2]) + json.dumps({"step": 4}))  # a whole row that lost only its newline
    writer = MetricsWriter(tmp_path, start_step=4)
    writer.write(6, {"loss": 0.5})
    assert steps_of(read_metrics(path)) == [2, 4, 6]


def test_metrics_damaged_middle_line_is_skipped_with_a_message(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write(rows_text([2]) + "garbage\n" + rows_text([4, 6]))
    assert steps_of(read_metrics(path)) == [2, 4, 6]
    messages = []
    read_metrics(path, log=messages.append)
    assert f"{path} line 2" in messages[0]
    MetricsWriter(tmp_path, start_step=4, log=messages.append)
    assert steps_of(read_metrics(path)) == [2, 4] and "dropped it" in messages[-1]


def test_tensorboard_missing_is_a_config_error_before_any_change(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    (tmp_path / "metrics.jsonl").write_text(rows_text([2, 4, 6]))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        MetricsWriter(tmp_path, tensorboard=True, start_step=2)
    assert steps_of(read_metrics(tmp_path / "metrics.jsonl")) == [2, 4, 6]


def fake_tensorboard(monkeypatch, error: OSError | None = None):
    class SummaryWriter:  # as torch's: creates its folder, then opens an event file in it
        def __init__(self, log_dir):
            os.makedirs(log_dir, exist_ok=True)
            if error is not None:
                raise error

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))


def test_tensorboard_folder_that_is_a_file_names_the_path(tmp_path, monkeypatch):
    fake_tensorboard(monkeypatch)
    (tmp_path / "tensorboard").write_text("not a folder")
    with pytest.raises(PathError, match=f"train.tensorboard: {tmp_path / 'tensorboard'} is a file"):
        MetricsWriter(tmp_path, tensorboard=True)


def test_tensorboard_writer_os_error_names_the_path_and_the_fix(tmp_path, monkeypatch):
    events = str(tmp_path / "tensorboard" / "events.out")
    fake_tensorboard(monkeypatch, PermissionError(errno.EACCES, "Permission denied", events))
    with pytest.raises(PathError, match=f"cannot write {events}: Permission denied; permission denied: choose"):
        MetricsWriter(tmp_path, tensorboard=True)


# ----------------------------------------------------------------------------- routing/events.jsonl


def event_lines(steps) -> str:
    return "".join(json.dumps({"step": s, "kind": "deadlock"}) + "\n" for s in steps)


def make_record(tmp_path, steps=range(1, 11), events=(3, 5, 9)) -> rec.RecordWriter:
    writer = rec.RecordWriter(tmp_path / "routing", header(), start_step=0)
    writer.append(random_records(list(steps)), token_rows([2, 6]))
    with open(writer.events_path, "w") as f:
        f.write(event_lines(events))
    return writer


def resume_killed(tmp_path, monkeypatch) -> rec.RecordWriter:
    """A record, then a resume at step 6 killed in the middle of its writes."""
    writer = make_record(tmp_path)
    patch_writes(monkeypatch)
    try:
        rec.RecordWriter(writer.dir, header(), start_step=6)
    except Killed:
        pass
    return writer


def test_events_kill_while_resuming_keeps_the_events(tmp_path, monkeypatch):
    resume_killed(tmp_path, monkeypatch)
    assert steps_of(rec.RoutingRecord(tmp_path).events) in ([3, 5], [3, 5, 9])


def test_events_torn_last_line_resumes_and_reads(tmp_path):
    writer = make_record(tmp_path)
    with open(writer.events_path, "a") as f:
        f.write('{"step": 10, "ki')  # killed mid-append
    assert steps_of(rec.RoutingRecord(tmp_path).events) == [3, 5, 9]  # diagnose reads it
    resumed = rec.RecordWriter(writer.dir, header(), start_step=10)  # train --resume opens it
    resumed.append_events([{"step": 12, "kind": "deadlock_end"}])
    assert steps_of(rec.RoutingRecord(tmp_path).events) == [3, 5, 9, 12]
    assert writer.events_path.read_text() == event_lines([3, 5, 9]) + json.dumps(
        {"step": 12, "kind": "deadlock_end"}) + "\n"


def test_events_damaged_middle_line_is_skipped_and_named(tmp_path):
    writer = make_record(tmp_path)
    with open(writer.events_path, "w") as f:
        f.write(event_lines([3]) + "\0\0\0\0\n" + event_lines([5, 9]))  # disk damage, not a crash
    record = rec.RoutingRecord(tmp_path)
    assert steps_of(record.events) == [3, 5, 9]
    assert len(record.notes) == 1 and f"{writer.events_path} line 2" in record.notes[0]
    messages = []
    rec.RecordWriter(writer.dir, header(), start_step=6, log=messages.append)
    assert writer.events_path.read_text() == event_lines([3, 5])
    assert "line 2" in messages[0] and "dropped it" in messages[0]


# ----------------------------------------------------------------------------- routing/header.json


def test_header_kill_while_resuming_keeps_the_header(tmp_path, monkeypatch):
    resume_killed(tmp_path, monkeypatch)
    assert rec.RoutingRecord(tmp_path).header == header()


@pytest.mark.parametrize("damage", [b"", b'{"format": "moedit-rou', b"[1, 2]"])
def test_unreadable_header_is_rebuilt_on_resume_and_records_kept(tmp_path, damage):
    writer = make_record(tmp_path)
    (writer.dir / "header.json").write_bytes(damage)
    messages = []
    resumed = rec.RecordWriter(writer.dir, header(), start_step=6, log=messages.append)
    assert "rebuilt it" in messages[0] and str(writer.dir / "header.json") in messages[0]
    assert list(resumed.existing_records()["step"]) == [1, 2, 3, 4, 5, 6]
    back = rec.RoutingRecord(tmp_path)
    assert back.header == header() and np.array_equal(back.records, random_records(list(range(1, 11)))[:6])
    assert not (tmp_path / "routing.before_step_6").exists()


def test_unreadable_header_with_records_of_another_layout_is_moved_aside(tmp_path):
    writer = make_record(tmp_path)
    (writer.dir / "header.json").write_bytes(b"")
    with open(writer.records_path, "ab") as f:
        f.write(b"\1" * 12)  # not a whole number of records of the current layout
    messages = []
    rec.RecordWriter(writer.dir, header(), start_step=6, log=messages.append)
    assert "moved it to" in messages[0] and "unreadable" in messages[0]
    assert (tmp_path / "routing.before_step_6" / "records.bin").stat().st_size > 0
    assert len(rec.RoutingRecord(tmp_path).records) == 0


def test_unreadable_header_on_diagnose_says_how_to_rebuild(tmp_path):
    writer = make_record(tmp_path)
    (writer.dir / "header.json").write_bytes(b"")
    with pytest.raises(rec.DiagnosticsError, match=r"header.json is damaged: it is empty.*--resume"):
        rec.RoutingRecord(tmp_path)


# ----------------------------------------------------------------------------- summary.json, .bin rows


def test_summary_kill_while_writing_keeps_the_previous_one(tmp_path, monkeypatch):
    writer = make_record(tmp_path)
    with open(writer.dir / "summary.json", "w") as f:
        f.write(json.dumps({"deadlock": []}))
    patch_writes(monkeypatch)
    with pytest.raises(Killed):
        writer.write_summary({"deadlock": [], "saturation": []})
    assert rec.RoutingRecord(tmp_path).summary == {"deadlock": []}


def test_damaged_summary_is_ignored_with_a_note(tmp_path):
    writer = make_record(tmp_path)
    (writer.dir / "summary.json").write_text('{"deadlock": [')
    record = rec.RoutingRecord(tmp_path)
    assert record.summary is None and "summary.json is damaged" in record.notes[0]


def test_partial_rows_are_cut_before_appending(tmp_path):
    """(Verifies behaviour that already held: a row torn by a crash never shifts the rows appended after.)"""
    writer = make_record(tmp_path)
    for path in (writer.records_path, writer.tokens_path):
        with open(path, "ab") as f:
            f.write(b"\7" * 5)
    assert list(rec.RoutingRecord(tmp_path).tokens["step"]) == [2, 6]  # the reader ignores the partial row
    resumed = rec.RecordWriter(writer.dir, header(), start_step=10)
    resumed.append(random_records([11]), token_rows([11]))
    back = rec.RoutingRecord(tmp_path)
    assert list(back.records["step"]) == list(range(1, 12)) and list(back.tokens["step"]) == [2, 6, 11]
    assert np.array_equal(back.records[-1:], random_records([11]))


# ----------------------------------------------------------------------------- report.md


def test_report_kill_while_writing_keeps_the_previous_report(tmp_path, monkeypatch, capsys):
    writer = make_record(tmp_path)
    (writer.dir / "summary.json").write_text("")  # damaged too: ignored, noted in the report and on stderr
    report = write_report(tmp_path)
    text = report.read_text()
    assert "warning:" in capsys.readouterr().err and "summary.json is damaged" in text
    patch_writes(monkeypatch)
    with pytest.raises(Killed):
        write_report(tmp_path)
    assert report.read_text() == text

