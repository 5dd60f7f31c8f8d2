"""studies/pooled.py: one fixed setting's paired differences pooled over several studies' seeds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tdc_core.run.study import interval

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("pooled", ROOT / "studies" / "pooled.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _diffs(study: str, metric: str) -> list[float]:
    records = json.loads((ROOT / "studies" / study / "replicates.json").read_text())
    return [r["tdc"][metric] - r["baseline"][metric] for r in records if r["arm"] == "tdc"]


def test_pooled_interval_is_over_every_seed_of_every_source(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert _script().main(["digits-final-sensitivity:tdc", "digits-final-stage2:tdc"]) == 0
    out = capsys.readouterr().out
    assert "pooled over 10 training seeds" in out
    pooled = interval(_diffs("digits-final-sensitivity", "fid_mean") + _diffs("digits-final-stage2", "fid_mean"))
    row = next(line for line in out.splitlines() if line.startswith("| FID"))
    assert row.split(" | ")[1] == pooled.signed()
    # the committed table is what the script prints now
    assert out.strip() in (ROOT / "studies" / "digits-final-pooled.md").read_text()


def test_a_seed_in_two_sources_is_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="appear in an earlier source"):
        _script().main(["digits-final-stage2:tdc", "digits-final-stage2:tdc"])


def test_different_settings_are_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    # loss-budgets overrides budget.difficulty: not the default
    with pytest.raises(SystemExit, match="not one setting"):
        _script().main(["digits-final-stage2:tdc", "digits-final-sensitivity:loss-budgets"])
