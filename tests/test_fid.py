"""FID/KID through clean-fid, the reference-statistics cache, and the feature extractors."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import cleanfid
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cleanfid import fid as cleanfid_fid
from torch import nn

from tdc_core.config import load_config
from tdc_core.errors import ConfigError
from tdc_core.evaluation import features as fx
from tdc_core.evaluation.features import (
    DIGITS_LABEL,
    INCEPTION_ENV_VAR,
    FeatureExtractor,
    InceptionExtractor,
    build_extractor,
    load_digits_extractor,
)
from tdc_core.evaluation.fid import (
    FeatureStats,
    fid_from_features,
    frechet_distance,
    kernel_distance,
    reference_statistics,
)
from tdc_core.training.data import dataset_fingerprint, load_images, split_heldout

# Third-party deprecation notices (clean-fid's scipy call, TorchScript, torchvision's
# `pretrained`), not ours; they would bury real warnings.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*`disp` argument is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Arguments other than a weight enum:UserWarning"),
    pytest.mark.filterwarnings("ignore:The parameter .pretrained. is deprecated:UserWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Tiny CPU workloads: see ``one_thread`` in conftest."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache folder for the whole test session: the digits CNN is trained once."""
    return tmp_path_factory.getbasetemp() / "tdc-cache"


@pytest.fixture(scope="module")
def digits(cache_dir):
    """The smoke config's digits CNN (trained once into this module's cache; test_evaluate's
    config, so it is shared) and the smoke data split."""
    cfg = load_config(preset="smoke", overrides=["data.max_images=null", f"eval.cache_dir={cache_dir}"])
    extractor = build_extractor(cfg.eval, cfg.data)
    train, heldout = split_heldout(load_images(cfg.data), fraction=0.1, seed=0)
    return extractor, cfg, train, heldout


class CountingExtractor(FeatureExtractor):
    """Wraps an extractor and counts feature extractions (optionally under another identity)."""

    def __init__(self, inner: FeatureExtractor, *, identity: str | None = None) -> None:
        self.inner, self.calls = inner, 0
        self.kind, self.mode, self.label, self.dim = inner.kind, inner.mode, inner.label, inner.dim
        self.identity = identity or inner.identity

    def features(self, images, *, batch_size=250):
        self.calls += 1
        return self.inner.features(images, batch_size=batch_size)


# --- the distances are clean-fid's -------------------------------------------------------------


def test_fid_equals_cleanfid_frechet_distance_on_the_same_features():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(250, 16))
    expected = cleanfid_fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-12)
    assert fid_from_features(a, b) == pytest.approx(cleanfid_fid.fid_from_feats(a, b), rel=1e-12)
    assert frechet_distance(FeatureStats.from_features(a), FeatureStats.from_features(b)) == pytest.approx(expected)


def test_kid_equals_cleanfid_kernel_distance_and_is_reproducible():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(120, 8)), rng.normal(0.5, 1.0, size=(100, 8))
    np.random.seed(7)
    expected = cleanfid_fid.kernel_distance(a, b)
    before = np.random.get_state()[1].copy()
    assert kernel_distance(a, b, seed=7) == pytest.approx(expected, rel=1e-12)
    assert kernel_distance(a, b, seed=7) == kernel_distance(a, b, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's global RNG is untouched


def test_fid_of_a_set_against_itself_is_zero(digits):
    extractor, _, train, _ = digits
    feats = extractor.features(train)
    assert abs(fid_from_features(feats, feats)) < 1e-6


def test_kid_of_two_samples_of_one_distribution_is_near_zero(digits):
    # KID is unbiased for independent samples; a set against itself is not that (negative bias).
    extractor, _, train, _ = digits
    half_a, half_b = extractor.features(train[:100]), extractor.features(train[100:200])
    noise = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert abs(kernel_distance(half_a, half_b)) < 0.02 * kernel_distance(half_a, extractor.features(noise))


def test_fid_grows_monotonically_with_noise(digits, cache_dir):
    extractor, cfg, train, heldout = digits
    ref = reference_statistics(images=train, fingerprint=dataset_fingerprint(cfg.data, train), extractor=extractor,
                               cache_dir=cache_dir)
    noise = torch.randn(heldout.shape, generator=torch.Generator().manual_seed(0))
    feats = []
    for sigma in (0, 16, 32, 64, 128, 255):  # pixel units; the same draw scaled (common random numbers)
        noisy = (heldout.float() + sigma * noise).round().clamp(0, 255).to(torch.uint8)
        feats.append(extractor.features(noisy))
    fids = [frechet_distance(FeatureStats.from_features(f), ref.stats) for f in feats]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


# --- reference statistics cache ---------------------------------------------------------------


def test_reference_statistics_are_computed_once_and_reused(digits, tmp_path):
    extractor, cfg, train, _ = digits
    counting = CountingExtractor(extractor)
    fingerprint = dataset_fingerprint(cfg.data, train)
    first = reference_statistics(images=train, fingerprint=fingerprint, extractor=counting, cache_dir=tmp_path)
    second = reference_statistics(images=train, fingerprint=fingerprint, extractor=counting, cache_dir=tmp_path)
    assert counting.calls == 1
    assert (first.reused, second.reused) == (False, True)
    assert np.array_equal(first.stats.mu, second.stats.mu) and np.array_equal(first.stats.sigma, second.stats.sigma)
    assert np.array_equal(first.features, second.features)
    stored = Path(second.info.path)
    assert stored.is_file() and tmp_path in stored.parents
    assert Path(cleanfid.__file__).parent not in stored.parents  # never inside site-packages
    assert second.info.feature_extractor == extractor.identity and second.info.fid_mode == extractor.mode
    assert second.info.num_images == train.shape[0] and second.info.resolution == train.shape[-1]


def test_a_changed_dataset_or_extractor_invalidates_reference_statistics(digits, tmp_path):
    extractor, cfg, train, _ = digits
    counting = CountingExtractor(extractor)
    fp = dataset_fingerprint(cfg.data, train)
    base = reference_statistics(images=train, fingerprint=fp, extractor=counting, cache_dir=tmp_path)
    fewer = train[:-1]
    changed_data = reference_statistics(images=fewer, fingerprint=dataset_fingerprint(cfg.data, fewer),
                                        extractor=counting, cache_dir=tmp_path)
    assert counting.calls == 2 and not changed_data.reused
    other = CountingExtractor(extractor, identity=extractor.identity + "-retrained")
    changed_extractor = reference_statistics(images=train, fingerprint=fp, extractor=other, cache_dir=tmp_path)
    assert other.calls == 1 and not changed_extractor.reused
    assert len({base.info.key, changed_data.info.key, changed_extractor.info.key}) == 3
    # The original entry is still valid and still reused.
    assert reference_statistics(images=train, fingerprint=fp, extractor=counting, cache_dir=tmp_path).reused


def test_a_damaged_reference_entry_is_recomputed(digits, tmp_path):
    extractor, cfg, train, _ = digits
    counting = CountingExtractor(extractor)
    fp = dataset_fingerprint(cfg.data, train)
    first = reference_statistics(images=train, fingerprint=fp, extractor=counting, cache_dir=tmp_path)
    Path(first.info.path).write_bytes(b"truncated")
    again = reference_statistics(images=train, fingerprint=fp, extractor=counting, cache_dir=tmp_path)
    assert counting.calls == 2 and not again.reused
    assert np.allclose(again.stats.mu, first.stats.mu)


# --- the offline digits extractor --------------------------------------------------------------


def test_digits_extractor_is_accurate_labelled_and_runs_offline(digits, monkeypatch):
    extractor, _, train, _ = digits
    assert extractor.accuracy > 0.95  # trained on the 1617 training digits, measured on the 180 held out
    assert extractor.label == DIGITS_LABEL and "not comparable with Inception FID" in extractor.label
    assert extractor.describe() == {"feature_extractor": extractor.identity, "fid_mode": "digits-native",
                                    "comparability": DIGITS_LABEL}

    def no_network(*args, **kwargs):
        raise AssertionError("the digits extractor must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    feats = extractor.features(train[:10])
    assert feats.shape == (10, extractor.dim) and feats.dtype == np.float64
    assert next(extractor.model.parameters()).device.type == "cpu"


def test_digits_extractor_is_cached_by_recipe_and_reused(digits, cache_dir, monkeypatch):
    extractor, _, train, _ = digits
    monkeypatch.setattr(fx, "train_digits_cnn", lambda recipe: pytest.fail("a cached extractor was retrained"))
    again = load_digits_extractor(cache_dir=cache_dir, recipe=extractor.recipe)
    assert again.identity == extractor.identity and again.path == extractor.path
    assert extractor.path.is_file() and cache_dir in extractor.path.parents
    assert np.array_equal(again.features(train[:8]), extractor.features(train[:8]))


def test_digits_extractor_accepts_other_sizes_and_rgb(digits):
    extractor, _, train, _ = digits
    big = F.interpolate(train[:4].float(), size=(16, 16), mode="nearest").to(torch.uint8)
    rgb = big.expand(-1, 3, -1, -1).contiguous()
    assert extractor.features(rgb).shape == (4, extractor.dim)
    assert np.allclose(extractor.features(rgb), extractor.features(big), atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        extractor.features(train[:4].float())


def test_auto_picks_the_digits_extractor_for_digits_data(cache_dir):
    cfg = load_config(preset="smoke", overrides=[f"eval.cache_dir={cache_dir}"])
    assert cfg.eval.feature_extractor == "auto"
    assert build_extractor(cfg.eval, cfg.data).kind == "digits"


# --- Inception: local weights, and a clear error without them ----------------------------------


class _FakeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3)))[:, :, None, None]


class _FakeInception(nn.Module):
    """Shaped like clean-fid's TorchScript Inception: ``.layers`` and ``forward(x, return_features)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, no clean-fid default file, no env var: the download is attempted and fails."""
    attempts = []

    def refuse(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(fx, "_cleanfid_default_path",
                        lambda mode: tmp_path / "nowhere" / fx.inception_weights_name(mode))
    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    return attempts


def test_inception_without_weights_or_network_fails_fast_with_a_clear_error(offline, tmp_path):
    cfg = load_config(preset="smoke", overrides=["eval.feature_extractor=inception", f"eval.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        build_extractor(cfg.eval, cfg.data)
    message = str(info.value)
    # Fails fast: exactly one attempt at clean-fid's URL, no retries.
    assert len(offline) == 1 and "inception-2015-12-05.pt" in offline[0]
    for needle in ("inception-2015-12-05.pt", "eval.inception_weights", INCEPTION_ENV_VAR,
                   str(tmp_path / "inception" / "inception-2015-12-05.pt"), "download failed",
                   "Temporary failure in name resolution", "eval.feature_extractor=digits"):
        assert needle in message, needle
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no deep URLError chain


def test_inception_error_names_the_pytorch_fid_file_in_legacy_pytorch_mode(offline, tmp_path):
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05-6726825d.pth"):
        InceptionExtractor.load(mode="legacy_pytorch", cache_dir=tmp_path, environ={}, allow_download=False)
    assert not offline  # downloads disabled: no attempt at all


def test_missing_configured_or_env_weights_are_named(offline, tmp_path):
    with pytest.raises(ConfigError, match="eval.inception_weights=.*does not exist"):
        InceptionExtractor.load(weights=tmp_path / "missing.pt", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=f"{INCEPTION_ENV_VAR}=.*names no file"):
        InceptionExtractor.load(cache_dir=tmp_path, environ={INCEPTION_ENV_VAR: str(tmp_path / "gone.pt")})
    assert not offline


def test_inception_uses_a_local_weights_file_without_network(offline, tmp_path, monkeypatch):
    weights = tmp_path / "my-inception.pt"  # any name: it is linked under the name clean-fid loads
    torch.jit.script(_FakeInception()).save(str(weights))
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(weights))
    cfg = load_config(preset="smoke", overrides=["eval.feature_extractor=inception", f"eval.cache_dir={tmp_path}"])
    extractor = build_extractor(cfg.eval, cfg.data)
    assert isinstance(extractor, InceptionExtractor) and extractor.weights == weights
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = extractor.features(images, batch_size=2)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    assert not offline  # no download attempted
    assert extractor.mode == "clean" and extractor.identity.endswith("/clean") and "sha256:" in extractor.identity
    assert "not comparable" not in extractor.label and "'clean'" in extractor.label
    # The same file configured explicitly wins over the env var; another mode is another identity.
    tf = InceptionExtractor.load(mode="legacy_tensorflow", weights=weights, cache_dir=tmp_path, environ={})
    assert tf.identity != extractor.identity and tf.features(images).shape == (3, 2048)


def test_a_corrupt_inception_file_is_a_clear_error(offline, tmp_path):
    bad = tmp_path / "inception-2015-12-05.pt"
    bad.write_bytes(b"half a download")
    with pytest.raises(ConfigError, match="cannot be loaded.*interrupted download"):
        InceptionExtractor.load(weights=bad, cache_dir=tmp_path, environ={})


def test_a_successful_download_lands_atomically_in_the_cache(offline, tmp_path, monkeypatch):
    scripted = tmp_path / "served.pt"
    torch.jit.script(_FakeInception()).save(str(scripted))

    class Response:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def read(self) -> bytes:
            return self.data

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    served = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: served.append(url) or Response(scripted.read_bytes()))
    cache = tmp_path / "cache"
    extractor = InceptionExtractor.load(cache_dir=cache, environ={})
    assert extractor.weights == cache / "inception" / "inception-2015-12-05.pt"
    assert extractor.weights.read_bytes() == scripted.read_bytes() and len(served) == 1
    assert [p.name for p in extractor.weights.parent.iterdir()] == ["inception-2015-12-05.pt"]  # no temp files
    InceptionExtractor.load(cache_dir=cache, environ={})
    assert len(served) == 1  # found in the cache the second time


def test_legacy_pytorch_mode_loads_pytorch_fid_weights_from_a_local_file(offline, tmp_path, monkeypatch):
    import cleanfid.inception_pytorch as ip
    import torchvision

    original = ip.load_state_dict_from_url
    # Random weights in pytorch-fid's layout: build clean-fid's FID Inception with loading skipped.
    with monkeypatch.context() as m:
        m.setattr(ip, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, state: None)
        state = ip.fid_inception_v3().state_dict()
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, weights)
    extractor = InceptionExtractor.load(mode="legacy_pytorch", weights=weights, cache_dir=tmp_path, environ={})
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert extractor.features(images).shape == (2, 2048)
    assert not offline
    assert ip.load_state_dict_from_url is original  # clean-fid's own loader is back
    assert "legacy_pytorch" in extractor.identity
