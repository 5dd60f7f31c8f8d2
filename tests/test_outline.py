"""One place lists the stages in order (tdc_core.run.outline.STAGES); the flow follows it."""

from __future__ import annotations

import ast
import inspect
import textwrap

from prefect import Task

import flows.cli as cli
import flows.pipeline as pipeline
from tdc_core.run.outline import STAGES, next_stage


def _flow_task_order(body=pipeline._stages) -> list[str]:  # noqa: ANN001
    """Names of the Prefect tasks ``body`` calls (names resolved in flows.pipeline), in the order
    they appear."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(body)))
    calls = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    order: list[str] = []
    for call in calls:
        f = call.func
        name = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else getattr(f, "id", None)
        obj = getattr(pipeline, name, None) if name else None
        if isinstance(obj, Task) and obj.name not in order:
            order.append(obj.name)
    return order


def test_the_flow_runs_the_stages_in_the_outlines_order():
    order = _flow_task_order()
    assert [s for s in order if s in STAGES] == list(STAGES), order


def _reordered_body(args):  # noqa: ANN001, ANN202 - read by the test below, never called
    grouped = group_task(*args)  # noqa: F821
    profile_task(*args, wait_for=[grouped])  # noqa: F821
    finetune_group_task.submit(*args, group=0)  # noqa: F821


def test_the_order_check_sees_a_reordering():
    # The test above must be able to fail: a body calling group before profile reads as such.
    assert _flow_task_order(_reordered_body) == ["group", "profile", "finetune"]


def test_next_stage_and_cli_hints_follow_the_outline(tmp_path):
    assert [next_stage(s) for s in STAGES] == [*STAGES[1:], None]
    assert set(cli._STAGE_COMMANDS) <= set(STAGES)
    assert cli._next_hint("profile", tmp_path) == f"next: tdc group --run-dir {tmp_path}"
    assert cli._next_hint("group", tmp_path).startswith(f"next: tdc train --out-dir {tmp_path}")
