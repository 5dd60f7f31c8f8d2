"""Sample-level metrics: k-NN precision/recall, memorization, paired bootstrap, real floor, KID rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tdc_core.errors import ConfigError
from tdc_core.evaluation.fid import FeatureStats, fid_from_features
from tdc_core.evaluation.sample_metrics import (
    KID_MIN_SAMPLES,
    kid_allowed,
    memorization,
    paired_bootstrap_difference,
    paired_bootstrap_fid,
    precision_recall,
    real_floor,
    save_nearest_neighbours_png,
)

# --- precision and recall --------------------------------------------------------------------------


def test_identical_distributions_give_precision_and_recall_near_one():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((2000, 2)), rng.standard_normal((2000, 2))
    pr = precision_recall(real_features=real, fake_features=fake)
    assert pr.precision > 0.9 and pr.recall > 0.9
    assert (pr.k, pr.n_real, pr.n_fake) == (3, 2000, 2000)


def test_collapse_to_one_of_two_modes_keeps_precision_and_halves_recall():
    rng = np.random.default_rng(1)
    centres = np.array([[-10.0, 0.0], [10.0, 0.0]])
    real = centres[np.arange(2000) % 2] + rng.standard_normal((2000, 2))
    fake = centres[0] + rng.standard_normal((1000, 2))
    pr = precision_recall(real_features=real, fake_features=fake)
    assert pr.precision > 0.9
    assert 0.45 <= pr.recall <= 0.52


def test_far_away_points_have_zero_precision_and_recall():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((300, 4))
    pr = precision_recall(real_features=real, fake_features=real + 1000.0)
    assert pr.precision == 0.0 and pr.recall == 0.0


def test_hand_computed_one_dimensional_example():
    real = np.array([[0.0], [4.0], [8.0], [12.0], [40.0]])
    fake = np.array([[-4.0], [1.0], [2.0], [3.0], [36.0], [38.0], [100.0]])
    # k = 1, self excluded: real radii 4, 4, 4, 4, 28 -> every fake point but 100 is inside
    # (-4 on the boundary of 0's ball); fake radii 5, 1, 1, 1, 2, 2, 62 -> real 0, 4 (|4-3| = 1,
    # on the boundary) and 40 (|40-38| = 2, on the boundary) are covered; 8 and 12 are not.
    pr1 = precision_recall(real_features=real, fake_features=fake, k=1)
    assert (pr1.precision, pr1.recall) == (6 / 7, 3 / 5)
    # k = 2: real radii 8, 4, 4, 8, 32 -> 100 still outside; fake radii 6, 2, 1, 2, 33, 35, 64 ->
    # 8 (|8-36| = 28 <= 33) and 12 now covered.
    pr2 = precision_recall(real_features=real, fake_features=fake, k=2)
    assert (pr2.precision, pr2.recall) == (6 / 7, 1.0)


def test_precision_recall_does_not_depend_on_chunking():
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((97, 5)), rng.standard_normal((61, 5)) + 0.5
    whole = precision_recall(real_features=real, fake_features=fake)
    chunked = precision_recall(real_features=torch.as_tensor(real), fake_features=fake, chunk_size=7)
    assert whole == chunked
    assert 0 < whole.precision < 1 and 0 < whole.recall < 1


def test_precision_recall_rejects_too_few_points():
    with pytest.raises(ConfigError, match="k=3"):
        precision_recall(real_features=np.zeros((3, 2)), fake_features=np.zeros((10, 2)))


# --- memorization ----------------------------------------------------------------------------------


def _training(n: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_memorization_flags_planted_copies_and_not_fresh_samples():
    train = _training()
    g = torch.Generator().manual_seed(1)
    exact = train[:10].clone()
    near = (train[10:20] + 0.01 * torch.randn(10, 1, 8, 8, generator=g)).clamp(-1, 1)
    fresh = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    averages = (train[20:40] + train[40:60]) / 2
    samples = torch.cat([exact, fresh[:10], near, averages, fresh[10:]])
    planted = np.r_[np.ones(10), np.zeros(10), np.ones(10), np.zeros(30)].astype(bool)
    mem = memorization(samples=samples, training=train)
    np.testing.assert_array_equal(mem.flagged, planted)
    assert mem.share_flagged == pytest.approx(20 / 60)
    np.testing.assert_array_equal(mem.nearest[:10], np.arange(10))
    np.testing.assert_array_equal(mem.nearest[20:30], np.arange(10, 20))
    assert np.all(mem.d1[:10] == 0) and np.all(mem.d1 <= mem.d2)
    # d1 and d2 are the true nearest and second-nearest distances.
    full = torch.cdist(samples.reshape(60, -1).double(), train.reshape(200, -1).double()).sort(dim=1).values
    np.testing.assert_allclose(mem.d1, full[:, 0].numpy(), atol=1e-12)
    np.testing.assert_allclose(mem.d2, full[:, 1].numpy(), atol=1e-12)


def test_memorization_ratio_and_chunking():
    train = _training()
    samples = torch.cat([train[:5] + 0.2, torch.rand(5, 1, 8, 8) * 2 - 1]).clamp(-1, 1)
    strict = memorization(samples=samples, training=train, ratio=1 / 3)
    loose = memorization(samples=samples.numpy(), training=train.numpy(), ratio=1.0, chunk_size=3)
    np.testing.assert_array_equal(strict.d1, loose.d1)
    np.testing.assert_array_equal(strict.nearest, loose.nearest)
    assert loose.share_flagged == 1.0          # with ratio 1 every sample "copies" its nearest image
    assert strict.share_flagged < 1.0


def test_exact_copy_of_a_duplicated_training_image_is_flagged():
    train = _training(50)
    train[7] = train[3]
    mem = memorization(samples=train[3:4].clone(), training=train)
    assert mem.d1[0] == 0 and mem.d2[0] == 0 and mem.flagged[0]


def test_memorization_at_digits_scale():
    g = torch.Generator().manual_seed(4)
    train = torch.rand(1797, 1, 8, 8, generator=g) * 2 - 1
    samples = torch.rand(2000, 1, 8, 8, generator=g) * 2 - 1
    samples[::100] = train[:20]
    mem = memorization(samples=samples, training=train)
    assert mem.share_flagged == pytest.approx(20 / 2000)
    np.testing.assert_array_equal(np.flatnonzero(mem.flagged), np.arange(0, 2000, 100))


def test_nearest_neighbour_png_has_the_expected_size_and_pairs(tmp_path):
    train = _training(30)
    samples = (train[:20].flip(0) * 0.5).contiguous()
    nearest = np.arange(20)[::-1].copy()
    path = save_nearest_neighbours_png(samples, train, nearest, tmp_path / "nn" / "pairs.png", n=16)
    img = np.asarray(Image.open(path))
    # 16 pairs, 4 per row -> 8 tiles x 4 rows; 8 px tiles enlarged x8 to 64 px, 4 px padding.
    assert img.shape == (4 * (64 + 4) + 4, 8 * (64 + 4) + 4)

    def to_u8(x: torch.Tensor) -> np.ndarray:
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    # tile (row 0, col 0) is sample 0, tile (0, 1) its neighbour training[19]; (1, 2) is sample 5.
    assert img[4, 4] == to_u8(samples[0, 0, 0, 0])
    assert img[4, 4 + 68] == to_u8(train[19, 0, 0, 0])
    assert img[4 + 68 + 8 * 2, 4 + 2 * 68 + 8 * 3] == to_u8(samples[5, 0, 2, 3])
    assert not list(path.parent.glob(".*.tmp"))


# --- paired bootstrap ------------------------------------------------------------------------------


def _mean_gap(x: np.ndarray, ref: np.ndarray) -> float:
    return float(x[:, 0].mean() - ref[:, 0].mean())


def test_identical_models_give_a_zero_difference_and_interval():
    rng = np.random.default_rng(5)
    a, ref = rng.standard_normal((100, 6)), rng.standard_normal((150, 6))
    for res in (paired_bootstrap_difference(a, a.copy(), ref, metric=_mean_gap, n_boot=50),
                paired_bootstrap_fid(a, a.copy(), ref, n_boot=20)):
        assert (res.difference, res.low, res.high, res.replicate_mean) == (0.0, 0.0, 0.0, 0.0)


def test_each_replicate_uses_the_same_rows_for_both_models():
    ids = np.arange(50, dtype=np.float64)[:, None]
    calls: list[np.ndarray] = []

    def recording(x: np.ndarray, ref: np.ndarray) -> float:
        calls.append(x[:, 0].copy())
        return float(x.sum())

    res = paired_bootstrap_difference(ids, ids + 1000, np.zeros((1, 1)), metric=recording, n_boot=30, seed=3)
    assert len(calls) == 2 * (30 + 1) and res.n == 50 and res.n_boot == 30
    for rows_a, rows_b in zip(calls[0::2], calls[1::2]):
        np.testing.assert_array_equal(rows_b, rows_a + 1000)
    np.testing.assert_array_equal(calls[0], ids[:, 0])
    assert all(len(np.unique(c)) < 50 for c in calls[2::2])    # replicates draw with replacement
    assert res.difference == -1000 * 50 and res.low == res.high == -1000 * 50


def test_paired_interval_covers_the_truth_and_beats_an_unpaired_one():
    rng = np.random.default_rng(6)
    n, true_gap = 400, -0.2
    shared = rng.standard_normal((n, 1))                        # the common initial noise
    a = shared + 0.05 * rng.standard_normal((n, 1))
    b = shared - true_gap + 0.05 * rng.standard_normal((n, 1))
    ref = np.zeros((1, 1))
    paired = paired_bootstrap_difference(a, b, ref, metric=_mean_gap, n_boot=400, seed=0, alpha=0.05)
    assert paired.low <= true_gap <= paired.high
    assert paired.low <= paired.difference <= paired.high
    boot = np.random.default_rng(0)
    unpaired = [_mean_gap(a[boot.integers(0, n, n)], ref) - _mean_gap(b[boot.integers(0, n, n)], ref)
                for _ in range(400)]
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    assert paired.high - paired.low < 0.2 * (hi - lo)


def test_closed_form_fid_bootstrap_equals_clean_fid_on_copied_rows():
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((6, 6))
    a = rng.standard_normal((60, 6)) @ mix
    b = rng.standard_normal((60, 6)) @ mix + 0.3
    ref = rng.standard_normal((90, 6)) @ mix
    fast = paired_bootstrap_fid(a, b, FeatureStats.from_features(ref), n_boot=15, seed=11)
    slow = paired_bootstrap_difference(a, b, ref, metric=fid_from_features, n_boot=15, seed=11)
    assert fast.difference == pytest.approx(fid_from_features(a, ref) - fid_from_features(b, ref), rel=1e-7)
    for field in ("difference", "low", "high", "replicate_mean"):
        assert getattr(fast, field) == pytest.approx(getattr(slow, field), rel=1e-6, abs=1e-9), field


def test_bootstrap_rejects_unpaired_sets():
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap_difference(np.zeros((5, 2)), np.zeros((6, 2)), None, metric=_mean_gap)


# --- real floor and KID ----------------------------------------------------------------------------


def test_real_floor_scores_disjoint_subsets():
    pool = np.c_[np.arange(30, dtype=np.float64), np.zeros(30)]
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def disjoint(x: np.ndarray, y: np.ndarray) -> float:
        assert len(x) == len(y) == 12
        assert np.intersect1d(x[:, 0], y[:, 0]).size == 0
        seen.append((x[:, 0].copy(), y[:, 0].copy()))
        return float(len(seen))

    floor = real_floor(pool, n=12, repeats=3, seed=0, metric=disjoint)
    assert floor.values == [1.0, 2.0, 3.0] and floor.mean == 2.0 and floor.sd == pytest.approx(1.0)
    assert (floor.n, floor.repeats, floor.pool_size) == (12, 3, 30)
    assert not np.array_equal(np.sort(seen[0][0]), np.sort(seen[1][0]))     # fresh subsets each repeat


def test_real_floor_with_fid_is_small_against_a_shifted_pair():
    rng = np.random.default_rng(8)
    pool = rng.standard_normal((400, 4))
    floor = real_floor(pool, n=200, repeats=2, seed=1)
    assert 0 <= floor.mean < 0.2 < fid_from_features(pool[:200], pool[200:] + 1.0)


def test_real_floor_needs_two_n_rows():
    with pytest.raises(ConfigError, match=r"n=5.*2n=10.*only 9"):
        real_floor(np.zeros((9, 3)), n=5, repeats=2, seed=0, metric=fid_from_features)


def test_kid_is_reported_only_from_two_thousand_samples():
    assert KID_MIN_SAMPLES == 2000
    assert kid_allowed(2000) and kid_allowed(50_000)
    assert not kid_allowed(1999) and not kid_allowed(500)
    assert kid_allowed(500, minimum=500)
