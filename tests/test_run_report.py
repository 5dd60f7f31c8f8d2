"""The run report's text: what a reader of ``report.md`` is told about the costs."""

from __future__ import annotations

from tasks.run_report import render_report


def _summary(*, baseline: dict | None) -> dict:
    return {
        "run_dir": "/nowhere/run", "mlflow_run_id": "r", "tracking_uri": "sqlite:///x.db", "boundaries": [0, 10],
        "groups": [{"group": 0, "lo": 0, "hi": 10, "rank": 0, "flops": 2e6, "budget_flops": 2e6, "budget_met": True}],
        "costs": {"sampler": "ddim", "sampling_steps": 10, "budgets_met": True,
                  "sampling": {"total_flops": 1e7, "single_model_flops": 2e7, "ratio": 0.5},
                  "training": {"pruning_flops": 1e9, "tdc_flops": 1e12, "baseline_flops": 1e12, "ratio": 1.0}},
        "comparison": None, "baseline": baseline, "registration": None,
    }


def test_the_cost_table_says_when_the_single_model_was_not_trained():
    trained, _ = render_report(_summary(baseline={"step": 100}))
    planned, _ = render_report(_summary(baseline=None))
    assert "| | TDC | single model | ratio |" in trained and "not trained" not in trained
    # Without a baseline the column is the equal-FLOPs single model's cost, not a model that exists.
    assert "| | TDC | single model (not trained: its cost) | ratio |" in planned
    assert "No evaluation (`eval.enabled=false` here)." in planned
