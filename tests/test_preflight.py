"""The checks before a run (:mod:`tdc_core.run.preflight`) and the cheap look at a data source they
use (:func:`tdc_core.training.data.peek_images`): same verdicts as loading, at a fraction of the cost."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tdc_core.run.preflight as pf
from tdc_core.config import load_config
from tdc_core.errors import ConfigError, DataError, TDCError, WriteError
from tdc_core.training.data import load_images, peek_images

RNG = np.random.default_rng(0)


def _cfg(*overrides: str):
    return load_config(preset="smoke", overrides=list(overrides))


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, list[str]]:
    """Overrides of several valid sources, each holding 40 images."""
    np.savez(tmp_path / "nhwc.npz", images=RNG.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    np.savez_compressed(tmp_path / "gray.npz", arr_0=RNG.integers(0, 256, (40, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "nchw.npy", RNG.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    imagenet = tmp_path / "imagenet"
    imagenet.mkdir()
    for i in (1, 2):  # 25 + 15 rows of CHW pixels
        np.savez(imagenet / f"train_data_batch_{i}.npz", data=RNG.integers(0, 256, (25 if i == 1 else 15, 192),
                                                                            dtype=np.uint8))
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    with (cifar / "data_batch_1").open("wb") as f:
        pickle.dump({b"data": RNG.integers(0, 256, (40, 3072), dtype=np.uint8)}, f, protocol=2)
    return {
        "imagenet64 (two files)": ["data.source=imagenet64", f"data.path={imagenet}", "data.channels=3"],
        "cifar10": ["data.source=cifar10", f"data.path={cifar}", "data.image_size=32", "data.channels=3",
                    "model.attention_resolutions=[16]"],
        "npz rgb → gray": ["data.source=npz", f"data.path={tmp_path / 'nhwc.npz'}"],
        "npz rgb": ["data.source=npz", f"data.path={tmp_path / 'nhwc.npz'}", "data.channels=3"],
        "compressed npz": ["data.source=npz", f"data.path={tmp_path / 'gray.npz'}"],
        "npy": ["data.source=npz", f"data.path={tmp_path / 'nchw.npy'}"],
        "folder": ["data.source=folder", f"data.path={folder}", "data.channels=3"],
        "digits": ["data.max_images=40"],
    }


@pytest.mark.parametrize("name", ["npz rgb → gray", "npz rgb", "compressed npz", "npy", "folder", "digits",
                                  "imagenet64 (two files)", "cifar10"])
def test_a_peek_sees_exactly_what_loading_gives(sources, name: str) -> None:
    data = _cfg(*sources[name]).data
    peek, full = peek_images(data, num=4), load_images(data)
    assert peek.num_images == full.shape[0] == 40 and peek.exact
    assert peek.sample.dtype == full.dtype and bool((peek.sample == full[:4]).all())


@pytest.mark.parametrize(("make", "needle"), [
    (lambda d: np.savez(d / "x.npz", images=np.zeros((5, 8, 8), np.float32)), "only uint8"),
    (lambda d: np.savez(d / "x.npz", images=np.zeros((5, 16, 16), np.uint8)), "16x16"),
    (lambda d: np.savez(d / "x.npz", images=np.zeros((5, 8, 8, 4), np.uint8)), "allowed: uint8"),
    (lambda d: np.savez(d / "x.npz", a=np.zeros((5, 8, 8), np.uint8), b=np.zeros(3)), "expected 'images'"),
    (lambda d: (d / "x.npz").write_bytes(b"PK\x03\x04 not really a zip"), "cannot read"),
    (lambda d: np.save(d / "x.npz", np.array([{"a": 1}], dtype=object)), r"object \(pickled\) arrays"),
])
def test_a_peek_refuses_what_loading_refuses(tmp_path: Path, make, needle: str) -> None:
    make(tmp_path)
    path = tmp_path / "x.npz"
    if not path.exists():  # np.save appended .npy
        (tmp_path / "x.npz.npy").rename(path)
    data = _cfg("data.source=npz", f"data.path={path}").data
    with pytest.raises(DataError, match=needle) as peeked:
        peek_images(data)
    with pytest.raises(DataError) as loaded:
        load_images(data)
    assert str(peeked.value).split(":")[0] == str(loaded.value).split(":")[0]  # both name the file


def test_a_peek_reads_the_first_rows_only(tmp_path: Path) -> None:
    """A truncated archive member whose header and first rows are intact passes the peek (the
    rest is read when the data is loaded): the peek does not decompress the whole array."""
    big = RNG.integers(0, 256, (2000, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=big)
    data = _cfg("data.source=npz", f"data.path={tmp_path / 'x.npz'}", "data.max_images=null").data
    opened: list[int] = []
    real_open = zipfile.ZipFile.open

    def counting_open(self, name, *args, **kwargs):
        handle = real_open(self, name, *args, **kwargs)
        real_read = handle.read
        handle.read = lambda n=-1: (opened.append(n), real_read(n))[1]
        return handle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zipfile.ZipFile, "open", counting_open)
        peek = peek_images(data, num=4)
    assert peek.num_images == 2000 and -1 not in opened and sum(n for n in opened if n > 0) < big.nbytes // 10


def test_preflight_lines_say_what_was_checked(tmp_path: Path) -> None:
    lines = pf.preflight(_cfg(), run_dir=tmp_path / "run", environ={})
    kinds = [line.split(":")[0] for line in lines]
    assert kinds == ["device", "data", "disk", "budgets", "features"]
    assert "256 images 1×8×8 (230 train, 26 held out)" in lines[1]
    assert not (tmp_path / "run").exists(), "the check writes nothing"


def test_too_few_held_out_images_for_evaluation_is_refused_but_fine_without_it(tmp_path: Path) -> None:
    cfg = _cfg("data.max_images=5")  # 10 % of 5 → 1 held-out image
    with pytest.raises(DataError, match="needs at least 2"):
        pf.preflight(cfg, run_dir=None, needs={"data", "features"})
    pf.preflight(cfg, run_dir=None, needs={"data"})


def test_the_disk_check_compares_free_space_with_the_checkpoints(tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg()
    need = pf.pipeline_checkpoints(cfg) * pf.checkpoint_bytes(cfg)
    # Independent count: 16 bytes (weights, EMA, two AdamW moments in fp32) per parameter.
    from tdc_core.model.unet import UNet
    from tdc_core.training.trainer import spec_for

    params = sum(p.numel() for p in UNet(spec_for(cfg)).parameters())
    assert pf.checkpoint_bytes(cfg) == 16 * params
    assert pf.pipeline_checkpoints(cfg) == 2 * (1 + cfg.grouping.num_groups + 1) + 1

    class Usage:
        free = need - 1

    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(WriteError, match="free on its disk, but the run writes about"):
        pf.preflight(cfg, run_dir=tmp_path / "run", needs={"disk"})
    Usage.free = need
    pf.preflight(cfg, run_dir=tmp_path / "run", needs={"disk"})


def test_missing_inception_weights_are_found_before_training(tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg("eval.feature_extractor=inception", f"eval.cache_dir={tmp_path}")

    def offline(**kwargs):
        assert kwargs["mode"] == "clean" and kwargs["allow_download"] is False
        raise ConfigError("Inception weights for clean-fid mode 'clean' were not found")

    monkeypatch.setattr(pf, "locate_inception_weights", offline)
    with pytest.raises(ConfigError, match="Inception weights"):
        pf.preflight(cfg, run_dir=None, needs={"features"}, allow_download=False)
    # Not needed when nothing is evaluated; still needed when TDC is evaluated alone.
    assert "features" not in pf.run_needs(_cfg("eval.enabled=false"))
    assert "features" in pf.run_needs(_cfg("baseline.enabled=false"))


def test_the_llm_proxy_needs_its_key_variable() -> None:
    overrides = ["prune.proxy=llm", "prune.llm_url=http://127.0.0.1:9/v1", "prune.llm_api_key_env=MY_KEY"]
    with pytest.raises(ConfigError, match="MY_KEY"):
        pf.preflight(_cfg(*overrides), run_dir=None, needs={"prune"}, environ={})
    assert pf.preflight(_cfg(*overrides), run_dir=None, needs={"prune"}, environ={"MY_KEY": "k"})
    # Not asked for when nothing is pruned.
    pf.preflight(_cfg(*overrides, "prune.enabled=false"), run_dir=None, needs={"prune"}, environ={})


def test_every_refusal_is_a_user_error() -> None:
    assert all(issubclass(e, TDCError) for e in (ConfigError, DataError, WriteError))
