"""FID and KID through clean-fid, against reference statistics cached as our own artifacts.

The distances are clean-fid's own functions, never re-implemented here:
:func:`frechet_distance` calls ``cleanfid.fid.frechet_distance(mu1, sigma1, mu2, sigma2)`` and
:func:`kernel_distance` calls ``cleanfid.fid.kernel_distance(feats1, feats2)`` (KID, the
unbiased MMD² with the cubic polynomial kernel, averaged over 100 random subsets of up to 1000).
Statistics are formed as clean-fid forms them: ``np.mean(feats, 0)`` and
``np.cov(feats, rowvar=False)``.

Reference statistics of a dataset are computed once per (dataset fingerprint, resolution,
extractor identity, mode) and cached under ``<cache_dir>/reference_stats/`` as an ``.npz``
(mu, sigma and the features, which KID needs) plus a ``.json`` that describes it; both are
written atomically. clean-fid's ``make_custom_stats`` is not used: it writes into
site-packages and refuses to overwrite.

**Which images are the reference** (``eval.reference``, :func:`choose_reference`): the held-out
split when it is chosen or when ``auto`` finds it at least ``eval.num_samples`` images large
(then the reference is disjoint from what the models were trained on), else the training split.
Every record names the split it used (:attr:`ReferenceInfo.split`) beside its image count.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from scipy.linalg import LinAlgWarning

from tdc_core.atomic import atomic_write_bytes
from tdc_core.evaluation.features import FeatureExtractor
from tdc_core.evaluation.reference import MIN_REFERENCE_IMAGES, ReferenceSplit, choose_reference

__all__ = [
    "MIN_REFERENCE_IMAGES",
    "FeatureStats",
    "ReferenceInfo",
    "ReferenceSplit",
    "ReferenceStats",
    "choose_reference",
    "fid_from_features",
    "frechet_distance",
    "kernel_distance",
    "reference_statistics",
    "score_features",
]

STATS_FORMAT = 1




@dataclass(frozen=True)
class FeatureStats:
    """Gaussian summary of features: ``mu [D]`` and ``sigma [D x D]`` (float64), from N images."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """Mean and covariance of ``[N x D]`` features, as clean-fid computes them (N ≥ 2)."""
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need features [N, D] with N >= 2, got shape {feats.shape}")
        return cls(mu=np.mean(feats, axis=0), sigma=np.cov(feats, rowvar=False), num=feats.shape[0])


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two Gaussian summaries: clean-fid's ``frechet_distance`` (≥ 0 up to rounding)."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    # With fewer images than feature dimensions the covariances are singular: scipy warns and
    # clean-fid prints a note when it regularises the product. Both are expected; keep them quiet.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning)
        return float(cleanfid_frechet(a.mu, a.sigma, b.mu, b.sigma))


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets ``[N x D]`` and ``[M x D]``."""
    return frechet_distance(FeatureStats.from_features(features_a), FeatureStats.from_features(features_b))


def kernel_distance(features_a: np.ndarray, features_b: np.ndarray, *, seed: int = 0) -> float:
    """KID between ``[N x D]`` and ``[M x D]`` features: clean-fid's ``kernel_distance``.

    clean-fid draws its subsets from numpy's global RNG; it is seeded with ``seed`` for the call
    and restored afterwards, so the score is reproducible and the caller's RNG is untouched.
    """
    from cleanfid.fid import kernel_distance as cleanfid_kid

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need features [N, D] and [M, D] with N, M >= 2, got {a.shape} and {b.shape}")
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(cleanfid_kid(a, b))
    finally:
        np.random.set_state(state)


# --- reference statistics ---------------------------------------------------------------------




class ReferenceInfo(BaseModel):
    """What a cached reference was computed from (the ``.json`` beside the ``.npz``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = STATS_FORMAT
    key: str                     # file stem: hash of the four fields below
    dataset_fingerprint: str     # tdc_core.training.data.dataset_fingerprint of the reference images
    resolution: int              # H = W of the reference images, in pixels
    feature_extractor: str       # extractor identity
    fid_mode: str                # clean-fid mode (or "digits-native")
    num_images: int              # N reference images
    feature_dim: int             # D
    path: str                    # the .npz
    # Which split of the data the images are (eval.reference). Not part of the key: the same
    # images are the same statistics; each caller's split is set on the returned info. Records
    # written before the field existed always used the training split.
    split: ReferenceSplit = "train"


@dataclass(frozen=True)
class ReferenceStats:
    """Reference statistics and features of a dataset (``features`` float32 ``[N x D]``)."""

    info: ReferenceInfo
    stats: FeatureStats
    features: np.ndarray
    reused: bool                 # True: read from the cache; False: computed by this call


def _reference_key(*, fingerprint: str, resolution: int, extractor: FeatureExtractor) -> str:
    text = f"{STATS_FORMAT}|{fingerprint}|{resolution}|{extractor.identity}|{extractor.mode}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _load_cached(npz_path: Path, json_path: Path, expected: dict[str, object]) -> ReferenceStats | None:
    """The cached entry, or None when it is missing, unreadable or describes something else."""
    if not (npz_path.is_file() and json_path.is_file()):
        return None
    try:
        info = ReferenceInfo.model_validate_json(json_path.read_bytes())
        if any(getattr(info, k) != v for k, v in expected.items()):
            return None
        with np.load(npz_path, allow_pickle=False) as npz:
            mu, sigma, feats = npz["mu"], npz["sigma"], npz["features"]
    except (OSError, ValueError, KeyError, ValidationError, zipfile.BadZipFile):
        return None
    if feats.shape != (info.num_images, info.feature_dim) or mu.shape != (info.feature_dim,):
        return None
    return ReferenceStats(info=info, stats=FeatureStats(mu=mu, sigma=sigma, num=info.num_images),
                          features=feats, reused=True)


def reference_statistics(
    *,
    images: torch.Tensor,
    fingerprint: str,
    extractor: FeatureExtractor,
    cache_dir: Path,
    batch_size: int = 250,
    recompute: bool = False,
    split: ReferenceSplit = "train",
) -> ReferenceStats:
    """Statistics of reference ``images`` (uint8 ``[N x C x H x W]``) under ``extractor``, from
    ``<cache_dir>/reference_stats/<key>.npz|.json`` when present, else computed and cached.
    ``split`` (which split of the data ``images`` are) is stated in the returned info.

    The key hashes (``fingerprint``, resolution H, extractor identity, mode): a changed
    dataset or extractor gets a new entry, never a stale one. ``fingerprint`` must identify
    ``images`` (:func:`tdc_core.training.data.dataset_fingerprint`); it is trusted, not recomputed, so a
    cache hit costs no feature extraction. A damaged entry is recomputed and overwritten.
    """
    resolution = int(images.shape[-1])
    key = _reference_key(fingerprint=fingerprint, resolution=resolution, extractor=extractor)
    folder = Path(cache_dir) / "reference_stats"
    npz_path, json_path = folder / f"{key}.npz", folder / f"{key}.json"
    expected = {"key": key, "dataset_fingerprint": fingerprint, "resolution": resolution,
                "feature_extractor": extractor.identity, "fid_mode": extractor.mode}
    if not recompute and (cached := _load_cached(npz_path, json_path, expected)) is not None:
        return ReferenceStats(info=cached.info.model_copy(update={"split": split}), stats=cached.stats,
                              features=cached.features, reused=True)
    feats = extractor.features(images, batch_size=batch_size)
    stats = FeatureStats.from_features(feats)
    stored = feats.astype(np.float32)  # KID needs the features; float32 halves the file
    buf = io.BytesIO()
    np.savez(buf, mu=stats.mu, sigma=stats.sigma, features=stored)
    atomic_write_bytes(npz_path, buf.getvalue())
    info = ReferenceInfo(**expected, num_images=feats.shape[0], feature_dim=feats.shape[1], path=str(npz_path),
                         split=split)
    # The .json is written last: its presence marks a complete entry.
    atomic_write_bytes(json_path, info.model_dump_json(indent=1).encode())
    return ReferenceStats(info=info, stats=stats, features=stored, reused=False)


def score_features(features: np.ndarray, reference: ReferenceStats, *, kid_seed: int = 0) -> tuple[float, float]:
    """``(FID, KID)`` of generated features ``[N x D]`` against ``reference``."""
    fid = frechet_distance(FeatureStats.from_features(features), reference.stats)
    kid = kernel_distance(features, reference.features, seed=kid_seed)
    return fid, kid
