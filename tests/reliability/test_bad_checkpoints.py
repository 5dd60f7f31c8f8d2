"""Bad checkpoints: missing, truncated, bit-flipped, edited or from another config. Loading one
(load_checkpoint, load_model, Trainer.resume, `tdc sample`) ends in one CheckpointError line that
names the file, never in a library traceback or a silently different model."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from flows.cli import main as cli_main
from tdc_core.checkpoint import load_checkpoint, save_checkpoint
from tdc_core.config import load_config
from tdc_core.diffusion import Diffusion
from tdc_core.errors import CheckpointError
from tdc_core.train import Trainer, load_model, prepare_data, spec_for

OVERRIDES = ["train.steps=1", "profile.profile_steps=0"]



def _trainer(cfg, images) -> Trainer:
    train, heldout = images
    return Trainer(spec=spec_for(cfg), diffusion=Diffusion.from_config(cfg.diffusion), train=cfg.train,
                   train_images=train, heldout_images=heldout, config=cfg)


class _Good(dict):
    def __repr__(self) -> str:  # hypothesis prints fixtures with a failing example: keep it short
        return f"<checkpoint {self['path']}>"


@pytest.fixture(scope="module")
def good(tmp_path_factory, one_thread) -> dict[str, Any]:
    """A real one-step training checkpoint of the smoke model, and what resuming it needs."""
    cfg = load_config(preset="smoke", overrides=OVERRIDES)
    images = prepare_data(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    _trainer(cfg, images).fit(until_step=1, checkpoint_path=path)
    return _Good(path=path, cfg=cfg, images=images, payload=load_checkpoint(path), bytes=path.read_bytes())


def _loaders(good: dict[str, Any]) -> dict[str, Callable[[Path], Any]]:
    return {
        "load_checkpoint": load_checkpoint,
        "load_model": load_model,
        "resume": lambda p: _trainer(good["cfg"], good["images"]).resume(p),
    }


def _assert_checkpoint_error(fn: Callable[[Path], Any], path: Path, *needles: str) -> None:
    with pytest.raises(CheckpointError) as err:
        fn(path)
    text = str(err.value)
    assert str(path) in text and "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def test_the_good_checkpoint_loads_everywhere(good) -> None:
    """Control for everything below."""
    for fn in _loaders(good).values():
        fn(good["path"])


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_model", "resume"])
def test_missing_and_truncated_checkpoints_name_the_file(good, tmp_path: Path, loader: str) -> None:
    fn = _loaders(good)[loader]
    _assert_checkpoint_error(fn, tmp_path / "never_written.pt", "does not exist")
    raw = good["bytes"]
    for cut in (0, 1, 100, len(raw) // 2, len(raw) - 1):
        path = tmp_path / f"cut_{cut}.pt"
        path.write_bytes(raw[:cut])
        _assert_checkpoint_error(fn, path)
    (tmp_path / "a_folder.pt").mkdir()
    _assert_checkpoint_error(fn, tmp_path / "a_folder.pt")


def _flip(raw: bytes, positions: list[float], xor: int) -> bytes:
    out = bytearray(raw)
    for p in positions:
        out[int(p * len(out))] ^= xor
    return bytes(out)


# No shrinking and the first failure only: the flip that broke loading is already small.
_FLIPS = settings(max_examples=60, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  report_multiple_bugs=False,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_FLIPS
@given(positions=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=3),
       xor=st.integers(1, 255))
def test_flipped_bytes_never_escape_as_other_errors(good, tmp_path: Path, positions, xor) -> None:
    """Wherever bytes flip, load_model gives a model or a CheckpointError, nothing else (today
    also ConfigError escapes when a flip lands in a stored config key: the train.py fix)."""
    path = tmp_path / "flipped.pt"
    path.write_bytes(_flip(good["bytes"], positions, xor))
    try:
        load_model(path)
    except CheckpointError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_model", "resume"])
def test_first_byte_flipped_is_a_checkpoint_error(good, tmp_path: Path, loader: str) -> None:
    """No longer a zip: torch reads it as a legacy pickle, whose unpickler fails oddly."""
    path = tmp_path / "flipped.pt"
    path.write_bytes(_flip(good["bytes"], [0.0], 0x01))
    _assert_checkpoint_error(_loaders(good)[loader], path)


def test_flipped_bytes_in_weights_are_detected(good, tmp_path: Path) -> None:
    """A bit flipped in the middle of the file (tensor data) must not load as a different model."""
    path = tmp_path / "flipped.pt"
    path.write_bytes(_flip(good["bytes"], [0.5], 0x01))
    _assert_checkpoint_error(load_model, path)


def _first(d: dict) -> str:
    return next(iter(d))


EDITS: dict[str, Any] = {
    # (edit of the payload, loaders that must refuse it)
    "format-version": (lambda p: p.__setitem__("format_version", 99), ("load_checkpoint", "load_model", "resume")),
    "ema-missing": (lambda p: p.pop("ema"), ("load_model", "resume")),
    "weight-renamed": (lambda p: p["ema"].__setitem__("bogus", p["ema"].pop(_first(p["ema"]))),
                       ("load_model", "resume")),
    "weight-reshaped": (lambda p: p["ema"].__setitem__(_first(p["ema"]), torch.zeros(1)), ("load_model", "resume")),
    "weight-not-a-tensor": (lambda p: p["ema"].__setitem__(_first(p["ema"]), 3), ("load_model", "resume")),
    "spec-not-a-dict": (lambda p: p.__setitem__("spec", None), ("load_model", "resume")),
    "config-changed": (lambda p: p["config"]["train"].__setitem__("lr", 0.5), ("resume",)),
    "config-invalid": (lambda p: p["config"]["train"].__setitem__("lr", -1), ("load_model", "resume")),
    "config-unknown-key": (lambda p: p["config"].__setitem__("evil", 1), ("load_model", "resume")),
    "spec-heads": (lambda p: p["spec"]["model"].__setitem__("num_heads", 3), ("load_model", "resume")),
    "spec-not-a-number": (lambda p: p["spec"].__setitem__("in_channels", "x"), ("load_model", "resume")),
    "step-missing": (lambda p: p.pop("step"), ("load_model", "resume")),
    "t-range-not-a-pair": (lambda p: p.__setitem__("t_range", 5), ("load_model", "resume")),
    "rng-missing": (lambda p: p.pop("rng"), ("resume",)),
    "sampler-state-garbage": (lambda p: p["rng"].__setitem__("sampler", {"x": 1}), ("resume",)),
}


@pytest.mark.parametrize(
    ("name", "loader"),
    [pytest.param(name, loader, id=f"{name}-{loader}")
     for name, (_, loaders) in EDITS.items() for loader in loaders],
)
def test_edited_checkpoint_is_refused_naming_the_file(good, tmp_path: Path, name: str, loader: str) -> None:
    """A checkpoint re-saved validly but with a key changed or removed (by hand or by a bug)."""
    payload = copy.deepcopy(good["payload"])
    payload.pop("format_version")
    EDITS[name][0](payload)
    path = tmp_path / f"edited-{name}.pt"
    save_checkpoint(path, payload)
    if name == "format-version":  # save_checkpoint writes its own version: overwrite it after
        torch.save({**payload, "format_version": 99}, path)
    _assert_checkpoint_error(_loaders(good)[loader], path)


@pytest.mark.parametrize("override", ["diffusion.num_timesteps=50", "data.max_images=128", "train.seed=1",
                                      "model.num_res_blocks=2"])
def test_resume_refuses_a_checkpoint_of_another_config(good, override: str) -> None:
    cfg = load_config(preset="smoke", overrides=[*OVERRIDES, override])
    images = prepare_data(cfg) if override.startswith("data.") else good["images"]
    _assert_checkpoint_error(_trainer(cfg, images).resume, good["path"], "different")


def test_cli_sample_with_a_bad_checkpoint_is_one_line(good, tmp_path: Path, capsys) -> None:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good["bytes"][:1000])
    for path in (tmp_path / "missing.pt", cut):
        assert cli_main(["sample", "--checkpoint", str(path), "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("tdc sample: error: ") and str(path) in err
    assert not (tmp_path / "x.png").exists()


def test_cli_sample_with_an_edited_checkpoint_is_one_line(good, tmp_path: Path, capsys) -> None:
    payload = copy.deepcopy(good["payload"])
    payload.pop("format_version")
    payload["spec"]["model"]["num_heads"] = 3
    path = tmp_path / "edited.pt"
    save_checkpoint(path, payload)
    assert cli_main(["sample", "--checkpoint", str(path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err
