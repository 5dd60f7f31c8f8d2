"""orchestration.*: where group fine-tunes run; refused before any compute when it cannot work."""

from __future__ import annotations

import pytest

from tdc_core.config import load_config
from tdc_core.errors import ConfigError


def test_orchestration_settings_change_no_run_key_and_are_validated():
    from tdc_core.config import config_key

    plain = load_config(preset="smoke")
    remote = load_config(preset="smoke", overrides=["orchestration.groups=deployment",
                                                     "orchestration.storage=s3://bucket/runs"])
    assert config_key(plain) == config_key(remote)  # the same models wherever the groups run
    with pytest.raises(ConfigError, match="orchestration.groups"):
        load_config(preset="smoke", overrides=["orchestration.groups=cluster"])
    with pytest.raises(ConfigError, match="group_deployment"):
        load_config(preset="smoke", overrides=["orchestration.group_deployment=no-slash"])


def test_deployment_mode_without_a_prefect_server_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    run = tmp_path / "run"
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        code = main(["run", "--preset", "smoke", "--run-dir", str(run), "orchestration.groups=deployment"])
    err = capsys.readouterr().err
    assert code == 2 and "set PREFECT_API_URL" in err and "orchestration.groups=deployment" in err
    assert "Traceback" not in err and not run.exists()  # nothing trained, no run folder


def _run_folder(root, shared: bytes):
    from tdc_core.run.layout import RunLayout

    layout = RunLayout(root)
    for path, data in ((layout.config, b"preset: smoke\n"), (layout.grouping_json, b"{}"),
                       (layout.budgets_json, b"{}"), (layout.shared_checkpoint, shared)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return layout


def test_a_stored_group_is_reused_only_for_the_same_inputs(tmp_path, monkeypatch):
    from tasks.handoff import finished_group, publish_inputs, pull_group, push_group
    from tasks.storage import open_store

    store = open_store(tmp_path / "store")
    layout = _run_folder(tmp_path / "run", b"shared model v1")
    inputs = publish_inputs(store, run_key="k", layout=layout)
    assert set(inputs.files) == {"config.yaml", "grouping/grouping.json", "grouping/budgets.json",
                                 "checkpoints/last.pt"}
    # The worker's download is a run folder of its own: stage 1 inside it, read unchanged.
    worker = tmp_path / "worker"
    store.get_bundle("k/inputs", worker)
    assert (worker / "checkpoints" / "last.pt").read_bytes() == b"shared model v1"

    group_dir = layout.group_dir(1)
    (group_dir / "prune" / "work").mkdir(parents=True)
    (group_dir / "prune" / "work" / "candidate.pt").write_bytes(b"scratch")
    (group_dir / "result.json").write_text("{}")
    push_group(store, run_key="k", layout=layout, group=1, inputs=inputs, ran_on={"host": "a"})
    assert finished_group(store, run_key="k", group=1, inputs=inputs) is not None
    assert finished_group(store, run_key="k", group=0, inputs=inputs) is None
    back = _run_folder(tmp_path / "back", b"")
    pulled = pull_group(store, run_key="k", layout=back, group=1)
    assert set(pulled.files) == {"result.json"}  # the pruning search's scratch space stays behind

    # Publishing the same inputs again uploads nothing; a new shared model invalidates the group.
    monkeypatch.setattr(store, "put_file", lambda *a, **k: pytest.fail("re-uploaded identical inputs"))
    assert publish_inputs(store, run_key="k", layout=layout) == inputs
    monkeypatch.undo()
    layout.shared_checkpoint.write_bytes(b"shared model v2")
    newer = publish_inputs(store, run_key="k", layout=layout)
    assert newer.digest != inputs.digest
    assert finished_group(store, run_key="k", group=1, inputs=newer) is None


def test_a_study_on_workers_needs_a_storage_every_worker_can_reach(tmp_path):
    from tdc_core.run.study import load_study

    f = tmp_path / "s.yaml"
    f.write_text("name: s\nseeds: [0]\nreplicates: deployment\narms: [{name: a, preset: smoke}]\n")
    with pytest.raises(ConfigError, match=r"study file .*s.yaml: .*replicates: deployment needs storage"):
        load_study(f)
    f.write_text("name: s\nseeds: [0]\nreplicates: deployment\nstorage: s3://b/p\narms: [{name: a, preset: smoke}]\n")
    assert load_study(f).storage == "s3://b/p"
