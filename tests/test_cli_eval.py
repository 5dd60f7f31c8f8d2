"""`tdc fid` and `tdc compare` as a user runs them (smoke runs, offline digits features)."""

from __future__ import annotations

import urllib.error
import urllib.request

from tdc_core.config import load_config, write_run_config
from tdc_core.evaluation import features as fx
from tdc_core.run import stages
from tdc_core.run.layout import RunLayout
from tdc_core.training.trainer import run_training


def _smoke_run(root, cache, *, baseline=True):
    """A tiny TDC run folder with its baseline in <run>/baseline, as `tdc run` leaves it; with
    ``baseline=False``, a run with ``baseline.enabled=false`` (TDC alone)."""
    overrides = ["train.steps=4", "profile.profile_steps=2", "finetune.steps=2", "grouping.num_groups=2",
                 "profile.num_buckets=4", f"eval.cache_dir={cache}", f"baseline.enabled={str(baseline).lower()}"]
    cfg = load_config(preset="smoke", overrides=overrides)
    layout = RunLayout(root)
    root.mkdir(parents=True)
    write_run_config(layout, cfg)
    stages.profile_stage(cfg, layout)
    stages.group_stage(cfg, layout)
    stages.shared_stage(cfg, layout)
    for g in range(cfg.grouping.num_groups):
        stages.finetune_group_stage(cfg, layout, group=g)
    if baseline:
        run_training(cfg, run_dir=root / "baseline", steps=4)
    return layout


def test_compare_and_fid_print_scores_and_write_the_table(tmp_path, tmp_path_factory, capsys):
    from flows.cli import main

    layout = _smoke_run(tmp_path / "run", tmp_path_factory.getbasetemp() / "tdc-cache")
    assert main(["compare", "--run-dir", str(layout.root), "--num", "8", "--seeds", "0,1", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "| tdc |" in out and "| baseline |" in out and "not comparable with Inception FID" in out
    for name in ("comparison.md", "comparison.json", "comparison.png", "tdc-samples.png", "baseline-samples.png",
                 "curve.json", "curve.png"):
        assert (layout.root / "eval" / name).is_file(), name
    ckpt = layout.root / "baseline" / "checkpoints" / "last.pt"
    assert main(["fid", "--checkpoint", str(ckpt), "--num", "8", "--seeds", "3", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "model seed 3: FID" in out and "digits-cnn" in out
    assert (layout.root / "baseline" / "eval" / "model-eval.json").is_file()


def test_fid_with_inception_and_no_weights_offline_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from flows.cli import main

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(fx, "_cleanfid_default_path", lambda mode: tmp_path / "none" / fx.inception_weights_name(mode))
    monkeypatch.delenv(fx.INCEPTION_ENV_VAR, raising=False)
    ckpt = run_training(load_config(preset="smoke"), run_dir=tmp_path / "m", steps=1).checkpoint
    rc = main(["fid", "--checkpoint", str(ckpt), "eval.feature_extractor=inception", f"eval.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "inception-2015-12-05.pt" in err and "TDC_INCEPTION_WEIGHTS" in err and "eval.inception_weights" in err


def test_compare_scores_a_run_without_a_baseline_alone(tmp_path, tmp_path_factory, capsys):
    """A run with baseline.enabled=false has no baseline to compare with: `tdc compare` scores
    TDC alone, as the pipeline did, instead of asking for a baseline the run never meant to train."""
    from flows.cli import main

    layout = _smoke_run(tmp_path / "run", tmp_path_factory.getbasetemp() / "tdc-cache", baseline=False)
    assert main(["compare", "--run-dir", str(layout.root), "--num", "8", "--seeds", "0", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "alone (no baseline)" in out and "| tdc |" in out and "| baseline |" not in out
    assert (layout.root / "eval" / "comparison.json").is_file()
    assert not (layout.root / "eval" / "curve.json").exists()  # the single model's curve needs its run


def test_compare_without_a_baseline_says_how_to_train_it(tmp_path, capsys):
    from flows.cli import main

    layout = RunLayout(tmp_path / "run")
    (tmp_path / "run").mkdir()
    write_run_config(layout, load_config(preset="smoke"))
    assert main(["compare", "--run-dir", str(layout.root)]) == 2
    assert "baseline checkpoint" in capsys.readouterr().err


def test_fid_of_some_experts_swapped_into_the_baseline(tmp_path, tmp_path_factory, capsys):
    """`tdc fid --run-dir R --experts G`: group G's timesteps by its expert, every other group's
    by the run's baseline, scored under its own name (the run's own scores stay)."""
    import re

    import pytest
    import torch

    from flows.cli import main
    from tdc_core.errors import ConfigError

    layout = _smoke_run(tmp_path / "run", tmp_path_factory.getbasetemp() / "tdc-cache")
    router = stages.assemble_router(layout, experts=[1], elsewhere=layout.baseline_checkpoint)
    expert = stages.assemble_router(layout).experts[1]
    base = stages.assemble_router(layout, experts=[], elsewhere=layout.baseline_checkpoint).experts[1]
    assert all(torch.equal(a, b) for a, b in zip(router.experts[1].state_dict().values(),
                                                  expert.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(router.experts[0].state_dict().values(),
                                                  base.state_dict().values()))
    assert main(["fid", "--run-dir", str(layout.root), "--experts", "1", "--num", "8", "--seeds", "0",
                 "--steps", "4"]) == 0
    assert "with the experts of groups [1]" in capsys.readouterr().out
    assert (layout.root / "eval" / "experts-1-eval.json").is_file()
    assert not (layout.root / "eval" / "tdc-eval.json").exists()
    for bad, match in ((["--experts", "5"], r"experts \[5\]: .* groups 0..1"), (["--experts", "x"], "allowed: comma")):
        assert main(["fid", "--run-dir", str(layout.root), *bad, "--num", "8", "--seeds", "0", "--steps", "4"]) != 0
        err = capsys.readouterr().err
        assert re.search(match, err) and "Traceback" not in err, err
    with pytest.raises(ConfigError, match="needs the checkpoint"):
        stages.assemble_router(layout, experts=[0])
