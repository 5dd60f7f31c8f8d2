"""The training loop: it learns, it resumes exactly, and its checkpoints survive crashes."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tdc_core.config import config_key, load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.errors import CheckpointError, TrainingError
from tdc_core.reporter import RecordingReporter
from tdc_core.training.checkpoint import load_checkpoint, save_checkpoint
from tdc_core.training.trainer import Trainer, init_model, load_model, prepare_data, run_training, spec_for


def make_trainer(cfg, **kw) -> Trainer:
    train, heldout = prepare_data(cfg)
    return Trainer(model=init_model(spec_for(cfg), seed=cfg.train.seed), diffusion=Diffusion.from_config(cfg.diffusion),
                   config=cfg, train_images=train, heldout_images=heldout, **kw)


def test_training_on_digits_lowers_heldout_loss(tmp_path):
    cfg = load_config(preset="smoke", overrides=["train.steps=80", "train.heldout_batches=4"])
    rec = RecordingReporter()
    res = run_training(cfg, run_dir=tmp_path, reporter=rec)
    assert res.step == 80
    assert res.heldout_loss < 0.6 * res.initial_heldout_loss
    losses = [v for _, v in rec.series("loss")]
    assert losses[-1] < 0.6 * losses[0]
    assert {"loss", "mse", "grad_norm", "lr", "images_per_sec"} <= set(rec.metrics[0][1])


def _weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"m.{k}": v for k, v in t.model.state_dict().items()},
            **{f"e.{k}": v for k, v in t.ema.state_dict().items()}}


def test_resume_equals_straight_training(tmp_path):
    # Dropout and flips make the global RNG and the sampler's state matter too.
    cfg = load_config(preset="smoke", overrides=["train.steps=12", "model.dropout=0.1", "data.random_flip=true",
                                                 "train.warmup_steps=4"])
    straight = make_trainer(cfg)
    straight.fit(until_step=12, checkpoint_path=tmp_path / "a.pt")

    first = make_trainer(cfg)
    first.fit(until_step=5, checkpoint_path=tmp_path / "b.pt")
    del first
    second = make_trainer(cfg)
    second.resume(tmp_path / "b.pt")
    assert second.step == 5
    second.fit(until_step=12, checkpoint_path=tmp_path / "b.pt")

    a, b = _weights(straight), _weights(second)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_checkpoint_rebuilds_the_model_alone(tmp_path):
    cfg = load_config(preset="smoke", overrides=["train.steps=3", "profile.profile_steps=0"])
    t = make_trainer(cfg)
    t.fit(until_step=3, checkpoint_path=tmp_path / "c.pt")
    loaded = load_model(tmp_path / "c.pt")
    assert loaded.config == cfg and loaded.step == 3 and loaded.t_range == (0, 100)
    x, ts = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99])
    torch.testing.assert_close(loaded.model(x, ts), t.ema.eval()(x, ts))


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    cfg = load_config(preset="smoke", overrides=["train.steps=2", "profile.profile_steps=0"])
    make_trainer(cfg).fit(until_step=2, checkpoint_path=tmp_path / "c.pt")
    other = make_trainer(load_config(preset="smoke",
                                     overrides=["train.steps=2", "profile.profile_steps=0", "train.lr=0.5"]))
    with pytest.raises(CheckpointError, match="different config"):
        other.resume(tmp_path / "c.pt")
    wider = make_trainer(load_config(preset="smoke",
                                     overrides=["train.steps=2", "profile.profile_steps=0", "model.base_channels=8"]))
    with pytest.raises(CheckpointError, match="different model"):
        wider.resume(tmp_path / "c.pt")


def test_resume_ignores_evaluation_settings_and_fields_added_since(tmp_path):
    """Re-evaluating a run does not retrain it, and a checkpoint written before a config field
    existed still resumes (the field takes its default)."""
    cfg = load_config(preset="smoke", overrides=["train.steps=2", "profile.profile_steps=0"])
    make_trainer(cfg).fit(until_step=2, checkpoint_path=tmp_path / "c.pt")
    evaluated = load_config(preset="smoke", overrides=["train.steps=2", "profile.profile_steps=0",
                                                       "eval.num_samples=9", "eval.heldout_per_image=7"])
    assert config_key(evaluated) == config_key(cfg)  # the same run folder
    make_trainer(evaluated).resume(tmp_path / "c.pt")
    payload = load_checkpoint(tmp_path / "c.pt")
    del payload["config"]["eval"]["heldout_per_image"]  # as written before the field existed
    save_checkpoint(tmp_path / "old.pt", payload)
    resumed = make_trainer(cfg)
    resumed.resume(tmp_path / "old.pt")
    assert resumed.step == 2


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_sigkill_during_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    code = f"""
import torch
from tdc_core.training.checkpoint import save_checkpoint
save_checkpoint({str(path)!r}, {{"step": 1, "w": torch.ones(3)}})
print("first", flush=True)
while True:
    save_checkpoint({str(path)!r}, {{"step": 2, "w": torch.zeros(60_000_000)}})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        deadline = time.time() + 60
        while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
            assert time.time() < deadline, "the second write never started"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    payload = load_checkpoint(path)
    assert payload["step"] in (1, 2)  # the old one, or a complete new one: never a torn file
    assert payload["w"].numel() in (3, 60_000_000)


def test_nonfinite_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    cfg = load_config(preset="smoke", overrides=["train.steps=20", "train.log_every=5", "train.checkpoint_every=5"])
    t = make_trainer(cfg)
    step = t._train_step

    def poisoned():
        out = step()
        if t.step == 7:
            with torch.no_grad():
                for p in t.model.parameters():
                    p.fill_(float("nan"))
        return out

    t._train_step = poisoned
    ckpt = tmp_path / "c.pt"
    with pytest.raises(TrainingError,
                       match=r"non-finite training loss between steps 6 and 10; last good checkpoint: .*c\.pt"):
        t.fit(until_step=20, checkpoint_path=ckpt)
    good = load_checkpoint(ckpt)
    assert good["step"] == 5
    assert all(torch.isfinite(v).all() for v in good["model"].values())


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_pickled_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "step": 1, "payload": _Evil(marker)}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a zip", None])
def test_missing_truncated_or_foreign_checkpoints(tmp_path, content):
    path = tmp_path / "c.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_truncated_real_checkpoint_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    torch.save({"w": torch.ones(1)}, path)  # a valid torch file, but not ours
    with pytest.raises(CheckpointError, match="not a TDC checkpoint"):
        load_checkpoint(path)
