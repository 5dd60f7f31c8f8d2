"""Live progress (:mod:`tasks.progress`) and its relay out of worker processes (:mod:`tdc_core.run.worker_reports`)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from tasks.progress import StageProgress
from tdc_core.reporter import RecordingReporter
from tdc_core.run.worker_reports import JsonlReporter, JsonlTail, read_jsonl_metrics


def test_plain_lines_at_start_each_quarter_and_end(capsys) -> None:
    p = StageProgress("shared training", tty=False, interval_s=1e9)  # no time-based lines
    for step in range(0, 101):
        if step % 10 == 0:
            p.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        p.progress(step=step, total=100)
    p.close()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "shared training: step" in ln]
    assert [int(re.search(r"step (\d+)/100", ln).group(1)) for ln in lines] == [0, 25, 50, 75, 100]
    assert re.search(r"step 50/100 \(50%\) · [\d.]+ steps/s · loss 0\.0196 · ETA \S+$", lines[2]), lines[2]
    assert "ETA" not in lines[-1] and "(100%)" in lines[-1]


def test_a_slow_stage_gets_a_line_every_interval(capsys) -> None:
    p = StageProgress("baseline", tty=False, interval_s=0.0)  # every report is "late"
    for step in range(1, 4):
        p.progress(step=step, total=1000)
    assert len([ln for ln in capsys.readouterr().out.splitlines() if "baseline: step" in ln]) == 3


def test_a_slow_step_is_reported_in_seconds_per_step(capsys, monkeypatch) -> None:
    """An evaluation step (one sampling seed) takes minutes: the line says 90 s/step, not 0.0 steps/s."""
    clock = iter([0.0, 90.0, 180.0])
    monkeypatch.setattr("tasks.progress.time.monotonic", lambda: next(clock))
    p = StageProgress("evaluation", tty=False, interval_s=1e9)
    p.progress(step=0, total=3)
    p.progress(step=1, total=3)
    p.progress(step=2, total=3)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "evaluation: step" in ln]
    assert lines[1].endswith("· 90 s/step · ETA 3m00s") and lines[2].endswith("· 90 s/step · ETA 1m30s"), lines
    assert "steps/s" not in "".join(lines)


def test_a_new_total_starts_a_new_phase(capsys) -> None:
    p = StageProgress("group 1", tty=False, interval_s=1e9)
    p.progress(step=0, total=3)  # pruning rounds
    p.progress(step=3, total=3)
    p.progress(step=0, total=10)  # then the fine-tune
    p.progress(step=10, total=10)
    out = capsys.readouterr().out
    steps = [m.group(0) for m in re.finditer(r"step \d+/\d+", out)]
    assert steps == ["step 0/3", "step 3/3", "step 0/10", "step 10/10"]


def test_terminal_bar_shows_step_total_rate_and_loss() -> None:
    stream = io.StringIO()
    p = StageProgress("shared training", stream=stream, tty=True)
    p.progress(step=0, total=50)
    p.log_metrics({"loss": 0.1234}, step=10)
    for step in range(1, 51):
        p.progress(step=step, total=50)
    p.close()
    text = stream.getvalue()
    assert "shared training" in text and "50/50" in text and "loss=0.1234" in text and "step/s" in text


def test_checkpoint_notices_are_not_shown_but_other_messages_are(capsys) -> None:
    p = StageProgress("group 0", tty=False)
    p.message("checkpoint at step 20: /x/last.pt")
    p.message("prune round 1/3: accepted #2")
    out = capsys.readouterr().out
    assert "checkpoint" not in out and "group 0: prune round 1/3: accepted #2" in out


def test_a_workers_progress_is_replayed_in_order_and_metrics_still_read(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    old = JsonlReporter(path)
    old.log_metrics({"loss": 9.0}, step=1)  # an earlier attempt's line: not replayed
    old.close()
    tail, seen = JsonlTail(path, RecordingReporter()), None
    w = JsonlReporter(path)
    w.progress(step=0, total=20)
    w.log_metrics({"loss": 0.5}, step=10)
    w.message("prune round 1/2: accepted #0")
    w.progress(step=20, total=20)  # the end is always written, however soon
    with path.open("a") as f:
        f.write('{"progress": [2')  # a torn line waits
    tail.poll()
    seen = tail.reporter
    assert seen.steps == [(0, 20), (20, 20)]
    assert seen.messages == ["prune round 1/2: accepted #0"] and seen.metrics == [(10, {"loss": 0.5})]
    with path.open("a") as f:
        f.write('1, 20]}\n')
    tail.poll()
    assert seen.steps[-1] == (21, 20)
    w.close()
    assert list(read_jsonl_metrics(path)) == [(1, {"loss": 9.0}), (10, {"loss": 0.5})]
