"""Which split of the data is the FID reference (``eval.reference``).

A leaf module: the FID statistics (``fid.py``) and the digits CNN (``features.py``, which must
not train on the reference) both need the choice.
"""

from __future__ import annotations

from typing import Literal

from tdc_core.errors import ConfigError

__all__ = ["MIN_REFERENCE_IMAGES", "ReferenceSplit", "choose_reference"]

ReferenceSplit = Literal["train", "heldout"]
# The real-vs-real floor scores two disjoint reference subsets of n >= 2 images each.
MIN_REFERENCE_IMAGES = 4


def choose_reference(setting: str, *, num_heldout: int, num_train: int, num_samples: int) -> ReferenceSplit:
    """The split ``eval.reference`` = ``setting`` makes the FID reference.

    ``train`` and ``heldout`` are taken as given; ``auto`` takes the held-out split when it
    holds at least ``eval.num_samples`` images (a reference disjoint from training and no smaller
    than one seed's samples), else the training split.

    Raises:
        ConfigError: ``heldout`` with fewer held-out images than ``eval.num_samples`` (or than
            the :data:`MIN_REFERENCE_IMAGES` that a real-vs-real floor needs), or an unknown
            setting.
    """
    need = max(num_samples, MIN_REFERENCE_IMAGES)
    if setting == "auto":
        return "heldout" if num_heldout >= need else "train"
    if setting == "heldout":
        if num_heldout < need:
            raise ConfigError(
                f"eval.reference=heldout needs at least {need} held-out images (eval.num_samples={num_samples}: "
                f"a reference no smaller than one seed's samples, and two disjoint halves for the real-vs-real "
                f"floor), but the held-out split holds {num_heldout} (data.heldout_fraction of "
                f"{num_heldout + num_train} images); allowed: eval.reference=auto or train, a larger "
                f"data.heldout_fraction, or a smaller eval.num_samples"
            )
        return "heldout"
    if setting == "train":
        return "train"
    raise ConfigError(f"eval.reference={setting!r} is not a reference split; allowed: auto, train, heldout")
