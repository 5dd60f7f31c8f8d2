"""The FID reference split (``eval.reference``) and the digits CNN that never trains on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tdc_core.config import DataConfig, load_config
from tdc_core.errors import ConfigError
from tdc_core.evaluation import features as fx
from tdc_core.evaluation.features import (
    DIGITS_COUNT,
    DigitsRecipe,
    FeatureExtractor,
    build_extractor,
    digits_cnn_split,
)
from tdc_core.evaluation.fid import ReferenceInfo, choose_reference, reference_statistics
from tdc_core.run.evaluation import reference_for_config
from tdc_core.run.preflight import preflight
from tdc_core.training.data import dataset_fingerprint, load_images, split_heldout

pytestmark = pytest.mark.filterwarnings("ignore:.*`disp` argument is deprecated:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Tiny CPU workloads: see ``one_thread`` in conftest."""


class PixelExtractor(FeatureExtractor):
    """Features = the pixels (64-d for 8x8 grayscale): reference statistics without a network,
    and features that show exactly which images went into a reference."""

    kind, identity, mode, label, dim = "pixels", "pixels-for-tests", "pixels", "pixels (tests only)", 64

    def __init__(self) -> None:
        self.calls = 0

    def features(self, images: torch.Tensor, *, batch_size: int = 250) -> np.ndarray:
        self.calls += 1
        return images.reshape(images.shape[0], -1).to(torch.float64).numpy()


def _rows(images: torch.Tensor | np.ndarray) -> set[bytes]:
    """Each image as bytes (uint8 pixels), for set comparisons."""
    arr = np.asarray(images, dtype=np.uint8)
    return {row.tobytes() for row in arr.reshape(arr.shape[0], -1)}


@pytest.fixture(scope="module")
def all_digits() -> torch.Tensor:
    """sklearn's 1797 digits at 8x8, as the pipeline loads them (and as the CNN reads them)."""
    images = load_images(DataConfig())
    assert torch.equal(images, fx._digits_with_labels()[0])  # the CNN's index i is the pipeline's digit i
    return images


# --- which split is the reference ----------------------------------------------------------------


def test_choose_reference_rules():
    assert choose_reference("auto", num_heldout=180, num_train=1617, num_samples=2000) == "train"
    assert choose_reference("auto", num_heldout=180, num_train=1617, num_samples=180) == "heldout"
    assert choose_reference("auto", num_heldout=3, num_train=10, num_samples=2) == "train"  # a floor needs 4
    assert choose_reference("train", num_heldout=5000, num_train=1617, num_samples=100) == "train"
    assert choose_reference("heldout", num_heldout=180, num_train=1617, num_samples=64) == "heldout"
    with pytest.raises(ConfigError, match=r"eval.reference=heldout needs at least 2000 held-out images.*holds 180"):
        choose_reference("heldout", num_heldout=180, num_train=1617, num_samples=2000)
    with pytest.raises(ConfigError, match="eval.reference='test' is not a reference split"):
        choose_reference("test", num_heldout=180, num_train=1617, num_samples=64)


@pytest.fixture
def synthetic(tmp_path):
    """40 random 8x8 images in an .npz; half are held out (20 / 20)."""
    images = torch.randint(0, 256, (40, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "synthetic.npz"
    np.savez(path, images=images.numpy())

    def config(*overrides: str):
        return load_config(preset="smoke", overrides=[
            "data.source=npz", f"data.path={path}", "data.max_images=null", "data.heldout_fraction=0.5",
            f"eval.cache_dir={tmp_path / 'cache'}", *overrides])
    return config


def test_auto_takes_the_heldout_split_when_it_holds_num_samples_images(synthetic):
    cfg = synthetic("eval.num_samples=20")
    ref, heldout, train = reference_for_config(cfg, PixelExtractor())
    assert (heldout.shape[0], train.shape[0]) == (20, 20)
    assert ref.info.split == "heldout" and ref.info.num_images == 20
    assert _rows(ref.features) == _rows(heldout) and not _rows(ref.features) & _rows(train)
    assert ref.info.dataset_fingerprint == dataset_fingerprint(cfg.data, heldout)


def test_auto_falls_back_to_the_training_split_when_the_heldout_split_is_too_small(synthetic):
    ref, heldout, train = reference_for_config(synthetic("eval.num_samples=21"), PixelExtractor())
    assert ref.info.split == "train" and ref.info.num_images == 20 and _rows(ref.features) == _rows(train)
    # eval.reference=train is taken as given even where the held-out split would do.
    forced = reference_for_config(synthetic("eval.num_samples=4", "eval.reference=train"), PixelExtractor())[0]
    assert forced.info.split == "train"


def test_a_too_small_heldout_reference_fails_before_any_features(synthetic):
    cfg = synthetic("eval.num_samples=21", "eval.reference=heldout")
    extractor = PixelExtractor()
    with pytest.raises(ConfigError, match=r"eval.reference=heldout needs at least 21 held-out images.*holds 20"):
        reference_for_config(cfg, extractor)
    assert extractor.calls == 0
    # Preflight (before any training) raises the same error; auto passes.
    with pytest.raises(ConfigError, match="eval.reference=heldout needs at least 21"):
        preflight(cfg, run_dir=None, needs={"data", "features"})
    ok = synthetic("eval.num_samples=21", "eval.feature_extractor=digits")
    assert preflight(ok, run_dir=None, needs={"data", "features"})


def test_cached_statistics_carry_the_callers_split_and_old_records_read_as_train(tmp_path):
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    kwargs = dict(images=images, fingerprint="f" * 16, extractor=PixelExtractor(), cache_dir=tmp_path)
    first = reference_statistics(**kwargs, split="heldout")
    again = reference_statistics(**kwargs, split="train")
    assert (first.info.split, again.info.split, again.reused) == ("heldout", "train", True)
    old = first.info.model_dump()
    del old["split"]  # a comparison.json written before eval.reference existed
    assert ReferenceInfo.model_validate(old).split == "train"


# --- the digits CNN never trains on the reference -------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(max_images=st.none() | st.integers(4, DIGITS_COUNT), fraction=st.floats(0.02, 0.98),
       seed=st.integers(0, 2**31 - 1), split=st.sampled_from(["train", "heldout"]))
def test_the_cnn_training_digits_are_disjoint_from_the_reference(all_digits, max_images, fraction, seed, split):
    data = DataConfig(max_images=max_images, heldout_fraction=fraction, split_seed=seed)
    train, heldout = split_heldout(load_images(data), fraction=fraction, seed=seed)  # the pipeline's split
    reference = train if split == "train" else heldout
    cnn_train, measured = digits_cnn_split(DigitsRecipe.for_data(data, reference_split=split))
    assert not _rows(all_digits[cnn_train]) & _rows(reference)
    assert _rows(all_digits[measured]) == _rows(reference)  # accuracy is measured on the reference
    assert cnn_train.numel() + measured.numel() == DIGITS_COUNT  # every other digit is used


def test_the_old_recipe_overlapped_the_reference(all_digits):
    """The check above has teeth: the old CNN (80 % of all digits) trained on reference digits."""
    train, _ = split_heldout(all_digits, fraction=0.1, seed=0)
    old_train, _ = digits_cnn_split(DigitsRecipe(reference_split=None))
    assert len(_rows(all_digits[old_train]) & _rows(train)) > 1000


def test_every_batch_the_cnn_trains_on_is_outside_the_reference(tmp_path, monkeypatch):
    """End to end: the images the training loop feeds the CNN vs the reference statistics'
    images, for the digits preset (reference: the training split; the CNN: the held-out digits)."""
    cfg = load_config(preset="digits", overrides=[f"eval.cache_dir={tmp_path}"])
    reference = reference_for_config(cfg, PixelExtractor())[0]
    assert reference.info.split == "train" and reference.info.num_images == 1617
    seen: list[torch.Tensor] = []
    original = fx._shift

    def spy(x, max_px, generator):
        seen.append(((x + 1.0) * 127.5).round().to(torch.uint8))
        return original(x, max_px, generator)

    monkeypatch.setattr(fx, "_shift", spy)
    recipe = DigitsRecipe.for_data(cfg.data, reference_split=reference.info.split, steps=12)
    fx.train_digits_cnn(recipe)
    trained_on = _rows(torch.cat(seen))
    assert len(trained_on) == 180  # 12 steps of 64 cover the 180 held-out digits
    assert not trained_on & _rows(reference.features)


def test_provenance_names_the_training_set_and_the_key_follows_it(tmp_path):
    cfg = load_config(preset="digits", overrides=[f"eval.cache_dir={tmp_path}"])  # reference: training split
    extractor = build_extractor(cfg.eval, cfg.data)
    stated = extractor.describe()["feature_extractor"]
    assert "trained on 180 digits disjoint from the FID reference, the 1617-digit training split" in stated
    assert "accurate on the reference" in stated and extractor.identity == stated
    assert 0.9 < extractor.accuracy < 1.0  # measured on the 1617 reference digits it never saw
    assert extractor.recipe.version == 2 and extractor.recipe.key() in extractor.path.name
    ref = reference_for_config(cfg, extractor)[0]
    assert ref.info.feature_extractor == stated and ref.info.split == "train"
    # Another reference split is another CNN (another cache key), and the first one is refused there.
    other = load_config(preset="digits", overrides=[f"eval.cache_dir={tmp_path}", "eval.num_samples=180"])
    assert DigitsRecipe.for_data(other.data, reference_split="heldout").key() != extractor.recipe.key()
    with pytest.raises(ConfigError, match="trained around another FID reference than this config's heldout split"):
        reference_for_config(other, extractor)
    # Non-digits data: sklearn's digits are not the reference; the CNN says so.
    npz = DigitsRecipe.for_data(DataConfig(source="npz", path=tmp_path / "x.npz"), reference_split="train")
    assert npz.reference_split is None and fx._training_set(npz, 0.98).startswith("trained on 1438 of sklearn's")
