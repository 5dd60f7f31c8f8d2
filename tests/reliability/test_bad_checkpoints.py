"""Bad checkpoints: missing, truncated, bit-flipped, edited or from another config. Loading one
(load_checkpoint, load_model, Trainer.resume, `tdc sample`) ends in one CheckpointError line that
names the file, never in a library traceback or a silently different model."""

from __future__ import annotations

import copy
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from flows.cli import main as cli_main
from tdc_core.config import load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.errors import CheckpointError
from tdc_core.training.checkpoint import load_checkpoint, save_checkpoint
from tdc_core.training.trainer import Trainer, init_model, load_model, prepare_data, spec_for

OVERRIDES = ["train.steps=1", "profile.profile_steps=0"]



def _trainer(cfg, images) -> Trainer:
    train, heldout = images
    return Trainer(model=init_model(spec_for(cfg), seed=cfg.train.seed), diffusion=Diffusion.from_config(cfg.diffusion),
                   config=cfg, train_images=train, heldout_images=heldout)


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
    return _Good(path=path, cfg=cfg, images=images, payload=load_checkpoint(path), bytes=path.read_bytes(),
                 model=load_model(path))


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


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of two loaded payloads: structure, exact types, float bits, tensors'
    dtype, shape, requires_grad and bytes. Independent of checkpoint.payload_digest."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return ((a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad)
                and bytes(a.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                == bytes(b.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


def _same_model(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return (_same(dict(sa), dict(sb)) and a.config == b.config and a.spec.to_dict() == b.spec.to_dict()
            and (a.step, a.t_range) == (b.step, b.t_range))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@_FLIPS
@given(positions=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=3),
       xor=st.integers(1, 255))
def test_flipped_bytes_load_the_same_model_or_are_a_checkpoint_error(good, tmp_path: Path, positions, xor) -> None:
    """Wherever bytes flip, load_model gives the very same model (weights, config, spec, step)
    or a one-line CheckpointError naming the file; never another error or another model."""
    path = tmp_path / "flipped.pt"
    path.write_bytes(_flip(good["bytes"], positions, xor))
    try:
        loaded = load_model(path)
    except CheckpointError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert _same_model(loaded, good["model"]), f"flips at {positions} ^ {xor:#x} load another model"


@pytest.mark.parametrize("loader", ["load_checkpoint", "load_model", "resume"])
def test_first_byte_flipped_is_a_checkpoint_error(good, tmp_path: Path, loader: str) -> None:
    """No longer a zip: torch reads it as a legacy pickle, whose unpickler fails oddly."""
    path = tmp_path / "flipped.pt"
    path.write_bytes(_flip(good["bytes"], [0.0], 0x01))
    _assert_checkpoint_error(_loaders(good)[loader], path)


def _members(raw_path: Path) -> dict[str, tuple[int, int]]:
    """Each zip member's stored bytes as ``[start, end)`` offsets in the file, read from the
    local file headers (zip spec: 30 fixed bytes, then the name and the extra field)."""
    raw = raw_path.read_bytes()
    out = {}
    with zipfile.ZipFile(raw_path) as z:
        for info in z.infolist():
            sig, *_, name_len, extra_len = struct.unpack_from("<4s5H3I2H", raw, info.header_offset)
            assert sig == b"PK\x03\x04"
            start = info.header_offset + 30 + name_len + extra_len
            out[info.filename] = (start, start + info.compress_size)
    return out


def test_a_flipped_bit_in_any_tensor_of_a_real_checkpoint_is_refused(good, tmp_path: Path) -> None:
    """One bit in the middle of 12 tensor storages spread over the training checkpoint (model,
    EMA, optimizer moments): each would load as other numbers; each is refused."""
    storages = sorted((r for name, r in _members(good["path"]).items() if "/data/" in name and r[1] > r[0]),
                      key=lambda r: r[0])
    assert len(storages) > 100
    path = tmp_path / "flipped.pt"
    for start, end in storages[:: len(storages) // 11][:12]:
        raw = bytearray(good["bytes"])
        raw[(start + end) // 2] ^= 0x10
        path.write_bytes(raw)
        _assert_checkpoint_error(load_checkpoint, path, "corrupt")


# A small checkpoint holding one of everything: a tensor in a nested dict, a view whose saved
# storage is larger than the view (its other bytes are outside the weights), a half tensor, a
# float, a string, a bool, a None, an int list and a tuple.
_BASE = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 7


def _tiny_payload() -> dict[str, Any]:
    return {"step": 3, "ema": {"w": _BASE[1:3, ::2], "h": torch.tensor([0.5, -2.0], dtype=torch.float16)},
            "config": {"lr": 0.001, "name": "s", "flag": True, "none": None, "mult": [1, 2]}, "t_range": (0, 100)}


def _flip_each(raw: bytes, path: Path, flips: list[tuple[int, int]], original: dict) -> dict[str, list]:
    """Write ``raw`` with each (byte, bit) flipped and load it: sort the flips by outcome."""
    outcome: dict[str, list] = {"refused": [], "same": [], "different": []}
    for i, bit in flips:
        out = bytearray(raw)
        out[i] ^= 1 << bit
        path.write_bytes(out)
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc), exc
            outcome["refused"].append((i, bit))
        else:
            outcome["same" if _same(loaded, original) else "different"].append((i, bit))
    return outcome


# Flips that break the pickle make torch warn about the "protocol" it then reads.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bit_flips_all_over_a_small_checkpoint_are_refused_or_load_the_same(tmp_path: Path) -> None:
    """Systematic flips over the whole file: two bits of every byte of the pickle (bit 0, where
    False becomes True and one small int another, and a rotating one), one rotating bit of every
    byte of every tensor storage, and of every third byte elsewhere (zip headers, padding,
    metadata). Each is refused, or the loaded payload is bitwise the one saved. (Before format
    2, flipping requires_grad's bit or a letter of the "digest" key loaded unchecked.)"""
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, _tiny_payload())
    raw = path.read_bytes()
    original = load_checkpoint(path)
    assert _same({k: v for k, v in original.items() if k != "format_version"}, _tiny_payload())
    members = _members(path)
    pickle_bytes = range(*members["archive/data.pkl"])
    storage_bytes = {i for name, (lo, hi) in members.items() if "/data/" in name for i in range(lo, hi)}
    flips = [(i, bit) for i in pickle_bytes for bit in sorted({0, 1 + i % 7})]
    flips += [(i, i % 8) for i in range(len(raw))
              if i not in pickle_bytes and (i in storage_bytes or i % 3 == 0)]
    outcome = _flip_each(raw, tmp_path / "flipped.pt", flips, original)
    assert outcome["different"] == []
    # Both outcomes happen where they must: the view's 2x2 of _BASE's 4x3 floats are elements
    # 3, 5, 6, 8 of the saved storage; flips there are refused, in the other 8 elements harmless.
    (lo, hi), = [r for name, r in members.items() if "/data/" in name and r[1] - r[0] == _BASE.numel() * 4]
    inside = {lo + 4 * e + k for e in (3, 5, 6, 8) for k in range(4)}
    assert {(i, i % 8) for i in inside} <= set(outcome["refused"])
    assert {(i, i % 8) for i in range(lo, hi) if i not in inside} <= set(outcome["same"])


def test_a_checkpoint_without_its_digest_is_refused(good, tmp_path: Path) -> None:
    """Format 2 always carries one: a missing digest is damage, not an old file."""
    path = tmp_path / "no-digest.pt"
    torch.save(good["payload"], path)  # format_version 2, no digest
    _assert_checkpoint_error(load_checkpoint, path, "digest")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_format_1_checkpoint_still_loads_and_its_flipped_bits_are_refused(tmp_path: Path) -> None:
    """Files written before format 2 (no digest at all) load; their zip CRC-32s stand in for
    the digest, so one bit flipped in any stored byte (rotating bit) is refused."""
    path = tmp_path / "v1.pt"
    torch.save({"format_version": 1, **_tiny_payload()}, path)
    original = load_checkpoint(path)
    assert original["format_version"] == 1 and _same({k: v for k, v in original.items() if k != "format_version"},
                                                     _tiny_payload())
    flips = [(i, i % 8) for lo, hi in _members(path).values() for i in range(lo, hi)]
    outcome = _flip_each(path.read_bytes(), tmp_path / "flipped.pt", flips, original)
    assert outcome["refused"] == flips


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
