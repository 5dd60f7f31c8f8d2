"""The records of an evaluation: what was measured, how, and the numbers (pydantic, frozen).

Everything a comparison reports lives in one :class:`Comparison`, written as ``comparison.json``
beside its Markdown and plot; every number in the run report and in MLflow is read from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tdc_core.config import PipelineConfig
from tdc_core.diffusion.samplers import Denoiser
from tdc_core.errors import ConfigError
from tdc_core.evaluation.fid import ReferenceInfo
from tdc_core.evaluation.heldout import HeldoutScore, PairedDifference
from tdc_core.evaluation.sample_metrics import BootstrapDifference, RealFloor

__all__ = [
    "Comparison",
    "ComparisonRow",
    "Contender",
    "ContenderCost",
    "EvalResult",
    "EvalSetup",
    "LikelihoodScore",
    "RealScore",
    "SampleQuality",
    "SeedScore",
]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalSetup(_Record):
    """What must be identical for every model in one comparison."""

    num_samples: int = Field(ge=2)           # generated images per seed
    seeds: tuple[int, ...] = Field(min_length=1)  # sample seeds; the spread over them is reported
    batch_size: int = Field(ge=1)            # generation and feature batch
    sampler: Literal["ddpm", "ddim"]
    steps: int | None = Field(ge=1)          # respaced sampling steps (None = all T)
    eta: float = Field(ge=0.0)               # DDIM noise scale
    heldout_per_image: int = Field(100, ge=1)  # stratified timesteps per held-out image (ε-/x0-MSE)
    bpd_timesteps: int | None = Field(100, ge=1)  # per image for bits/dim (None: all T, the exact bound)
    heldout_seed: int = 0                    # seed of the held-out triples and the bits/dim draws

    @classmethod
    def from_config(cls, config: PipelineConfig, *, num_samples: int | None = None,
                    seeds: Sequence[int] | None = None, sampler: str | None = None,
                    steps: int | None = None) -> EvalSetup:
        """``eval.*`` sample count, seeds, batch size and ``sample.*`` sampler, steps and eta,
        each replaceable by an explicit argument."""
        chosen_steps = config.sample.steps if steps is None else steps
        if chosen_steps is not None and chosen_steps > config.diffusion.num_timesteps:
            raise ConfigError(f"sampling steps={chosen_steps} exceed diffusion.num_timesteps="
                              f"{config.diffusion.num_timesteps}")
        try:
            return cls(num_samples=config.eval.num_samples if num_samples is None else num_samples,
                       seeds=tuple(config.eval.seeds if seeds is None else seeds), batch_size=config.eval.batch_size,
                       sampler=sampler or config.sample.sampler, steps=chosen_steps, eta=config.sample.eta,
                       heldout_per_image=min(config.eval.heldout_per_image, config.diffusion.num_timesteps),
                       bpd_timesteps=(None if config.eval.bpd_timesteps is None
                                      else min(config.eval.bpd_timesteps, config.diffusion.num_timesteps)),
                       heldout_seed=config.eval.heldout_seed)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"invalid evaluation setup: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class SeedScore(_Record):
    seed: int
    fid: float
    kid: float | None                        # only at ≥ KID_MIN_SAMPLES images (it flips rankings below)
    sampling_seconds: float                  # wall time to generate this seed's images


class EvalResult(_Record):
    """One model's scores over all seeds (every seed listed: no cherry-picking)."""

    name: str
    fid_mean: float
    fid_std: float                           # sample std over seeds (ddof = 1); 0 for one seed
    kid_mean: float | None                   # None below KID_MIN_SAMPLES images per seed
    kid_std: float | None
    per_seed: list[SeedScore]
    num_samples: int                         # per seed
    sampler: str
    sampling_steps: int                      # denoiser calls per image
    eta: float
    seconds_per_image: float                 # mean measured sampling time per image
    device: str
    feature_extractor: str                   # extractor identity
    fid_mode: str                            # clean-fid mode (or "digits-native")
    comparability: str                       # e.g. "digits-cnn features (not comparable with Inception FID)"
    reference: ReferenceInfo
    grid_png: str | None


class RealScore(_Record):
    """Real held-out images scored like a model: the floor a perfect model would reach at this
    sample count (FID is biased upwards for small N)."""

    name: str = "real held-out"
    fid: float
    kid: float | None
    num_images: int
    feature_extractor: str
    fid_mode: str
    comparability: str


class LikelihoodScore(_Record):
    """A model's held-out negative log-likelihood bound in bits/dim (:mod:`tdc_core.evaluation.likelihood`)."""

    name: str
    bpd: float
    bpd_se: float                            # over held-out images (incl. noise and timestep draws)
    prior_bpd: float
    boundaries: list[int]                    # the run's group edges
    group_bpd: list[float]                   # Σ of the bound's terms inside each group
    timesteps_per_image: int | None          # None: the exact bound (all T)
    num_images: int
    per_image_bpd: list[float]               # for paired differences


class SampleQuality(_Record):
    """Precision/recall (k-NN manifolds, in the FID features) and memorization (pixel L2) of one
    model's samples (all seeds pooled for precision/recall; the first seed for memorization)."""

    name: str
    precision: float
    recall: float
    k: int
    num_samples: int
    num_real: int
    memorized_share: float | None            # nearest training image closer than ratio × the second nearest
    memorization_ratio: float
    nearest_png: str | None                  # samples beside their nearest training images


class ContenderCost(_Record):
    """Costs in FLOPs (one multiply-add = 2), per image where stated."""

    forward_flops: list[float]               # per image, one entry per model (experts, or the single model)
    sampling_flops_per_image: float          # Σ over the sampler's steps of the serving model's FLOPs
    training_flops: float | None             # total training FLOPs (None = unknown)
    training_detail: str                     # how training_flops was counted


class ComparisonRow(_Record):
    eval: EvalResult
    cost: ContenderCost


class Comparison(_Record):
    setup: EvalSetup
    feature_extractor: str
    fid_mode: str
    comparability: str
    tdc: ComparisonRow
    baseline: ComparisonRow | None           # None: TDC evaluated alone (baseline.enabled=false)
    real_heldout: RealScore | None
    fid_difference: float | None             # TDC − baseline mean FID (negative: TDC better); None alone
    sampling_flops_ratio: float | None       # TDC / baseline, per image; None alone
    training_flops_ratio: float | None       # TDC / baseline
    notes: list[str]
    heldout: list[HeldoutScore] = []         # every model on the same held-out triples
    heldout_differences: list[PairedDifference] = []
    likelihood: list[LikelihoodScore] = []
    likelihood_differences: list[PairedDifference] = []
    sample_quality: list[SampleQuality] = []
    fid_difference_ci: BootstrapDifference | None = None  # TDC − baseline, paired over shared noise
    real_floor: RealFloor | None = None      # FID of two disjoint real subsets at the models' n
    markdown_path: str                       # the written files
    json_path: str
    plot_path: str


@dataclass(frozen=True)
class Contender:
    """A model to compare: a denoiser ``(x, t) -> out`` plus its costs."""

    name: str
    model: Denoiser
    cost: ContenderCost

