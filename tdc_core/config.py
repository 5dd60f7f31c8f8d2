"""One configuration tree for the whole pipeline.

A :class:`PipelineConfig` is built from a named preset, optionally a YAML/JSON file, and
dotted overrides (``train.lr=2e-4``), in that order. It is the Prefect flow's parameter, it is
logged as MLflow params (:func:`flatten`), and it is stored inside every checkpoint so any
checkpoint can be rebuilt alone.

Every invalid value raises :class:`~tdc_core.errors.ConfigError` whose message, one line, names
the dotted field, the bad value and what is allowed. The one check that needs the model's FLOPs
(budgets that pruning cannot reach) is :func:`tdc_core.method.budgets.check_budgets_reachable`: this
module is a leaf that imports no model code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tdc_core.atomic import atomic_write_bytes
from tdc_core.errors import ConfigError

__all__ = [
    "PRESETS",
    "BaselineConfig",
    "BudgetConfig",
    "EvalConfig",
    "DataConfig",
    "DiffusionConfig",
    "FinetuneConfig",
    "GroupingConfig",
    "ModelConfig",
    "PipelineConfig",
    "ProfileConfig",
    "PruneConfig",
    "SampleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_key",
    "flatten",
    "load_config",
    "read_run_config",
    "write_run_config",
]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored. Numbers must be finite
    (``.inf``/``.nan`` in YAML would train nothing, or forever)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, data: Any) -> Any:
        # YAML reads yes/no/true/false as booleans, and pydantic would quietly turn them into
        # 1/0 for a number field (train.steps=true -> 1 step). Handing pydantic the word
        # instead makes it report "valid integer/number ... (got 'true')" at the right field.
        if not isinstance(data, dict):
            return data

        def worded(value: Any) -> Any:
            if isinstance(value, bool):
                return str(value).lower()
            return [worded(v) for v in value] if isinstance(value, (list, tuple)) else value

        fields = cls.model_fields
        return {k: worded(v) if k in fields and _numeric(fields[k].annotation) else v for k, v in data.items()}


def _numeric(annotation: Any) -> bool:
    """Whether a field holds numbers (int, float, a Literal of ints, or containers of them)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in get_args(annotation))
    return any(_numeric(a) for a in get_args(annotation))


# Seeds feed torch, numpy and Python generators; numpy refuses negative seeds and torch ones
# above 2**64, and per-group seeds add offsets, so keep them in [0, 2**32).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


DataSource = Literal["digits", "cifar10", "imagenet64", "folder", "npz"]


class DataConfig(_Strict):
    source: DataSource = "digits"           # where images come from
    path: Path | None = None                 # file or folder; required unless source=digits
    image_size: int = Field(8, ge=4, le=1024)  # H = W in pixels; files must match it
    channels: Literal[1, 3] = 1              # 1 = grayscale, 3 = RGB
    heldout_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # share kept out of training
    max_images: int | None = Field(None, ge=2)  # use only the first N images (None = all)
    random_flip: bool = False                # horizontal flips as augmentation
    split_seed: Seed = 0                     # seed of the train/held-out split

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.source != "digits" and self.path is None:
            raise ValueError(f"data.path is required when data.source={self.source!r}")
        return self


class ModelConfig(_Strict):
    """IDDPM UNet (Nichol & Dhariwal 2021)."""

    # >= 2: the sinusoidal timestep embedding is base_channels wide and is empty at width 1.
    base_channels: int = Field(32, ge=2)                  # channels at the first level
    channel_mult: tuple[Annotated[int, Field(ge=1)], ...] = Field((1, 2), min_length=1)  # per level, x base_channels
    num_res_blocks: int = Field(2, ge=1)                  # residual blocks per level
    attention_resolutions: tuple[Annotated[int, Field(ge=1)], ...] = (4,)  # feature-map sizes (px) with attention
    num_heads: int = Field(4, ge=1)                       # attention heads
    num_head_channels: int | None = Field(None, ge=1)     # if set, heads = channels // this
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_scale_shift_norm: bool = True                     # FiLM-style timestep conditioning
    resblock_updown: bool = False                         # resample inside residual blocks
    norm_groups: int = Field(32, ge=1)                    # GroupNorm groups (capped by channels)
    time_embed_mult: int = Field(4, ge=1)                 # time-embedding width / base_channels


class DiffusionConfig(_Strict):
    schedule: Literal["linear", "cosine"] = "cosine"
    num_timesteps: int = Field(1000, ge=2)   # T
    loss: Literal["eps_mse", "hybrid"] = "eps_mse"  # hybrid = L_simple + lambda*L_vlb, learned sigma
    hybrid_vlb_weight: float = Field(0.001, ge=0.0)  # IDDPM's lambda
    # Condition the network on t·1000/T instead of t (IDDPM's rescale_timesteps, on in its
    # released unconditional models): needed for an imported IDDPM checkpoint to compute what it
    # computed in IDDPM when T != 1000.
    rescale_timesteps: bool = False

    @model_validator(mode="after")
    def _linear_needs_enough_steps(self) -> DiffusionConfig:
        # The linear schedule's β_T = 0.02·1000/T must stay below 1.
        if self.schedule == "linear" and self.num_timesteps <= 20:
            raise ValueError(
                f"diffusion.num_timesteps={self.num_timesteps} is too small for the linear "
                f"schedule (β would exceed 1); allowed: ≥ 21, or schedule=cosine"
            )
        return self


class TrainConfig(_Strict):
    steps: int = Field(2000, ge=0)           # hard step budget (optimizer steps)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)       # linear lr warm-up
    # constant: the probe, the shared model and the baseline are one run, so the baseline continues
    # the shared model. cosine: decay to 0 at train.steps; the schedule then depends on the run's
    # length, so the baseline is its own run from step 0 with a cosine over its own steps.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float | None = Field(1.0, gt=0.0)  # max global grad norm; None = off
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    # Per-sample weight of the ε-MSE: uniform, or Min-SNR-γ (min(SNR, γ)/SNR for ε-prediction).
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: float = Field(5.0, gt=0.0)
    log_every: int = Field(50, ge=1)         # steps between metric reports (host syncs)
    checkpoint_every: int = Field(500, ge=1)  # steps between checkpoints
    heldout_every: int = Field(500, ge=1)    # steps between held-out loss evaluations
    heldout_batches: int = Field(4, ge=1)    # batches per held-out evaluation
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA
    num_threads: int | None = Field(None, ge=1, le=4096)  # CPU threads for torch (None = torch default)
    # A non-finite loss: "stop" raises (naming the steps and the last good checkpoint);
    # "skip" drops that step's update, counts it, and stops after `max_skipped_steps`.
    # "skip" checks every step, i.e. one host sync per step.
    nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = Field(10, ge=1)
    # Speed levers (benchmarks/RESULTS.md): NHWC activations (None = on CUDA only), and
    # torch.compile of the training forward pass (off by default: compile takes minutes).
    channels_last: bool | None = None
    compile: bool = False
    # Processes for the pipeline's dense training (shared model, baseline), DDP under torchrun:
    # None = one per visible GPU (1 without GPUs). The global batch is split between them.
    processes: int | None = Field(None, ge=1, le=1024)
    # Stage 1 from a released openai/improved-diffusion checkpoint (a state dict, .pt) instead of
    # training: imported as the shared model at step `steps` (its published training length;
    # cifar10 500K, imagenet64 1.5M), which the cost report charges as IDDPM's training.
    init_from: str | None = Field(None, min_length=1)

    @property
    def length_free(self) -> bool:
        """Whether no schedule reads ``steps``, so a dense run of more steps continues a shorter
        one exactly: then the probe, the shared model and the baseline are one run (not so under
        ``lr_schedule=cosine``, which decays over each run's own length)."""
        return self.lr_schedule == "constant"


class SampleConfig(_Strict):
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: int | None = Field(50, ge=1)      # respaced steps; None = all T steps
    eta: float = Field(0.0, ge=0.0)          # DDIM stochasticity (0 = deterministic)
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=1)
    seed: Seed = 0
    use_ema: bool = True


class ProfileConfig(_Strict):
    """Difficulty profiling (docs/METHOD.md step 1); the probe is the start of shared training."""

    profile_steps: int = Field(500, ge=0)    # shared-training steps before profiling
    num_buckets: int = Field(50, ge=1)       # B fine buckets over [0, T)
    loss_samples_per_bucket: int = Field(256, ge=1)  # held-out images per bucket for the loss
    affinity_batches: int = Field(4, ge=1)   # batches averaged for gradient cosine similarity
    affinity_batch_size: int = Field(32, ge=1)
    param_subset: Literal["all", "output", "middle"] = "all"  # parameters whose gradients count
    # Pruning sensitivity: the loss again with the probe pruned uniformly to this keep ratio
    # (budget.difficulty=sensitivity ranks groups by it); None skips it.
    sensitivity_keep: float | None = Field(0.5, gt=0.0, lt=1.0)
    seed: Seed = 0


class GroupingConfig(_Strict):
    num_groups: int = Field(5, ge=1)         # N
    cost: Literal["snr", "loss", "affinity", "uniform", "combined"] = "combined"
    min_group_buckets: int = Field(1, ge=1)  # minimum group size, in buckets
    affinity_weight: float = Field(0.5, ge=0.0)  # weights of the `combined` cost
    loss_weight: float = Field(0.5, ge=0.0)


class BudgetConfig(_Strict):
    k: float = Field(0.5, gt=0.0, le=1.0)    # FLOPs_g(i) = (i/N + (N-i)/N * k) * F
    # What ranks groups from easy to hard: measured ε-loss, SNR (low = hard), or the measured
    # rise of the error when the probe is pruned (tdc_core.method.sensitivity).
    difficulty: Literal["loss", "snr", "sensitivity"] = "loss"
    reverse: bool = False                    # ablation: the hardest group gets the smallest budget


class FinetuneConfig(_Strict):
    """Stage 2's recipe: group fine-tunes and the pruning rounds' recovery fine-tunes."""

    steps: int = Field(500, ge=0)            # per-group fine-tuning steps
    lr: float = Field(1e-4, gt=0.0)
    batch_size: int | None = Field(None, ge=1)  # None = train.batch_size
    # Stage 2's own schedule. None inherits train.* (what every run did before these fields
    # existed; the "make TDC win" issue measures better values before any default changes).
    warmup_steps: int | None = Field(None, ge=0)       # linear warm-up of each fine-tune
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: to 0 at the fine-tune's last step
    loss_weighting: Literal["uniform", "min_snr"] | None = None  # None = train.loss_weighting (γ: train's)
    # shared: stage 2 starts from the shared model (TDC). scratch: the one-stage ablation, each
    # group's model freshly initialised at its budget's widths (one keep ratio for every unit),
    # trained on its timesteps alone; the cost then counts stage 1 up to the probe only.
    init: Literal["shared", "scratch"] = "shared"
    # AdamW's state at the start of a group fine-tune: fresh (zero moments), or the shared
    # model's (its moments and step count, as the baseline has when it continues the shared run)
    # for every parameter the pruning left whole; a pruned tensor's moments start fresh.
    optimizer: Literal["fresh", "shared"] = "fresh"
    # Which groups are fine-tuned: None, every group; t, only the groups whose first timestep is
    # below t. The others keep the shared model (pruned, with the pruning rounds' recovery, where
    # their budget is below F) and take no fine-tune steps, so TDC's training cost falls. A lever
    # of the "make TDC win" issue; on digits it costs FID (studies/digits-stage2-validation).
    until_t: int | None = Field(None, ge=1)
    # The learning rate of the groups from until_t: None, they are not fine-tuned (above); a
    # value, they are fine-tuned as the others but at this rate (a milder fine-tune there).
    lr_from_until_t: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _lr_from_until_t_needs_until_t(self) -> FinetuneConfig:
        if self.lr_from_until_t is not None and self.until_t is None:
            raise ValueError("finetune.lr_from_until_t sets the learning rate of the groups from finetune.until_t; "
                             "set finetune.until_t too (a timestep, e.g. 120)")
        return self


class PruneConfig(_Strict):
    """Proxy-guided progressive pruning of each group below F (docs/METHOD.md step 5)."""

    enabled: bool = True                     # False: experts keep full width (budgets unmet)
    rounds: int = Field(4, ge=1)             # R; round r targets F - (F - FLOPs_g)·r/R
    proxy: Literal["surrogate", "evolutionary", "random", "llm"] = "surrogate"
    candidates_per_round: int = Field(8, ge=1)  # proposals scored per round
    memory: bool = True                      # the proxy sees earlier rounds' candidates (False: ablation)
    importance: Literal["magnitude", "taylor"] = "taylor"  # which channels go, within a unit
    recovery_steps: int = Field(50, ge=0)    # fine-tune steps on the group between rounds
    score_batches: int = Field(2, ge=1)      # held-out batches that score one candidate
    tolerance: float = Field(0.02, ge=0.0, lt=0.5)  # final FLOPs ≤ budget·(1 + tolerance)
    min_keep: float = Field(0.1, gt=0.0, le=1.0)    # smallest keep ratio of any unit
    width_multiple: int = Field(8, ge=1)     # pruned widths: multiples of this where the dense width allows
    prune_attention: bool = True             # also prune attention q/k/v channels (by heads)
    llm_url: str | None = None               # OpenAI-compatible endpoint for proxy=llm
    llm_model: str = "gpt-4o-mini"
    llm_api_key_env: str = Field("TDC_LLM_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # env var name, never the key
    llm_timeout_s: float = Field(30.0, gt=0.0)
    seed: Seed = 0


class EvalConfig(_Strict):
    """FID/KID evaluation (clean-fid) of the ensemble and the baseline, identically."""

    # The run's evaluation (FID, precision/recall, held-out ε-MSE and bits/dim): of TDC against the
    # baseline, or of TDC alone with ``baseline.enabled=false`` (e.g. ablations that compare TDC
    # variants with each other: about half a digits replicate's time). false: no evaluation.
    enabled: bool = True
    num_samples: int = Field(1000, ge=2)     # generated images per seed
    seeds: tuple[Seed, ...] = Field((0, 1, 2), min_length=1)  # sample seeds; spread is reported
    feature_extractor: Literal["auto", "inception", "digits"] = "auto"  # auto: digits for digits data
    fid_mode: Literal["clean", "legacy_pytorch", "legacy_tensorflow"] = "clean"
    inception_weights: Path | None = None    # local Inception file (else $TDC_INCEPTION_WEIGHTS)
    batch_size: int = Field(250, ge=1)       # generation and feature batch
    cache_dir: Path | None = None            # reference statistics cache (None: ~/.cache/tdc)
    # FID reference: the held-out split (disjoint from training) or the training split; auto:
    # held-out when it holds >= num_samples images, else training (docs/METHOD.md, "Evaluation").
    reference: Literal["auto", "train", "heldout"] = "auto"
    # The held-out evaluator (docs/METHOD.md, "Evaluation"): every model on the same triples.
    heldout_per_image: int = Field(100, ge=1)  # stratified timesteps per held-out image (≤ T used)
    bpd_timesteps: int | None = Field(100, ge=1)  # bits/dim draws per image (None: all T, exact)
    heldout_seed: Seed = 0                   # seed of the held-out triples and the bits/dim draws


class BaselineConfig(_Strict):
    """The single-model baseline trained beside TDC (docs/METHOD.md, "The baseline")."""

    enabled: bool = True
    steps: int | None = Field(None, ge=1)    # None: the fewest steps costing ≥ TDC's total


class OrchestrationConfig(_Strict):
    """Where the group fine-tunes run and where their inputs and outputs live (not part of the
    run's key: the same config gives the same models wherever its groups run)."""

    # local: subprocesses of the flow's process (one per local GPU); deployment: one flow run
    # of ``group_deployment`` per group, picked up by any worker of its work pool.
    groups: Literal["local", "deployment"] = "local"
    # Storage root of the hand-off between the flow and group workers: a local folder or any
    # fsspec URL (s3://bucket/prefix, gs://..., file:///...). None: ``<run folder>/store``,
    # which only workers on this machine can reach.
    storage: str | None = None
    group_deployment: str = "tdc-group/group"   # <flow name>/<deployment name>
    # How long the flow waits for one group's flow run (None: no limit). A group whose run
    # crashed or timed out fails; a re-run resubmits only the groups without a stored result.
    group_timeout_s: float | None = Field(None, gt=0)
    # How often a group whose flow run crashed or failed is resubmitted before the pipeline
    # fails (a dead worker's run is marked Crashed by deployments/automations.yaml).
    group_retries: int = Field(1, ge=0)

    @field_validator("group_deployment")
    @classmethod
    def _flow_slash_deployment(cls, value: str) -> str:
        if value.count("/") != 1 or not all(value.split("/")):
            raise ValueError(f"group_deployment={value!r} must be '<flow name>/<deployment name>', "
                             f"e.g. 'tdc-group/group'")
        return value


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class PipelineConfig(_Strict):
    # Both become parts of folder and run names (runs/<name>-<preset>-<hash>): a "/" or a
    # leading "." could point outside the runs folder.
    name: str = "tdc"
    preset: str = "digits"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                f"name={value!r} becomes a folder name; allowed: 1-100 letters, digits, '.', '_' or '-', "
                f"starting with a letter or digit"
            )
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"preset={value!r} is not a preset; allowed: {', '.join(PRESETS)}")
        return value
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    profile: ProfileConfig = ProfileConfig()
    grouping: GroupingConfig = GroupingConfig()
    budget: BudgetConfig = BudgetConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    prune: PruneConfig = PruneConfig()
    eval: EvalConfig = EvalConfig()
    baseline: BaselineConfig = BaselineConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        down = 2 ** (len(self.model.channel_mult) - 1)
        if self.data.image_size % down:
            raise ValueError(
                f"data.image_size={self.data.image_size} must be divisible by {down}, the UNet's "
                f"total downsampling for model.channel_mult={list(self.model.channel_mult)}"
            )
        if self.data.image_size // down < 2:
            # GroupNorm over a 1x1 map of a narrow (e.g. pruned) block has one value per group:
            # torch refuses it for a batch of 1 (sampling one image, FLOP counting).
            raise ValueError(
                f"data.image_size={self.data.image_size} leaves 1x1 feature maps after the {down}x downsampling "
                f"of model.channel_mult={list(self.model.channel_mult)}; allowed: image_size >= {2 * down}, or "
                f"fewer levels"
            )
        sizes = {self.data.image_size // 2**i for i in range(len(self.model.channel_mult))}
        bad = [r for r in self.model.attention_resolutions if r not in sizes]
        if bad:
            raise ValueError(
                f"model.attention_resolutions={bad} are not feature-map sizes of this UNet; "
                f"allowed: {sorted(sizes, reverse=True)}"
            )
        self._check_attention_heads()
        if self.sample.steps is not None and self.sample.steps > self.diffusion.num_timesteps:
            raise ValueError(
                f"sample.steps={self.sample.steps} exceeds diffusion.num_timesteps="
                f"{self.diffusion.num_timesteps}"
            )
        if self.budget.difficulty == "sensitivity" and self.profile.sensitivity_keep is None:
            raise ValueError("budget.difficulty=sensitivity needs profile.sensitivity_keep (a keep ratio in (0, 1)); "
                             "allowed: set it, or budget.difficulty=loss or snr")
        if self.grouping.num_groups > self.profile.num_buckets:
            raise ValueError(
                f"grouping.num_groups={self.grouping.num_groups} exceeds profile.num_buckets="
                f"{self.profile.num_buckets}; allowed: 1..{self.profile.num_buckets}"
            )
        if self.grouping.num_groups * self.grouping.min_group_buckets > self.profile.num_buckets:
            raise ValueError(
                f"grouping.num_groups x grouping.min_group_buckets = "
                f"{self.grouping.num_groups * self.grouping.min_group_buckets} exceeds "
                f"profile.num_buckets={self.profile.num_buckets}"
            )
        if self.profile.num_buckets > self.diffusion.num_timesteps:
            raise ValueError(
                f"profile.num_buckets={self.profile.num_buckets} exceeds diffusion.num_timesteps="
                f"{self.diffusion.num_timesteps}"
            )
        if self.profile.profile_steps > self.train.steps:
            raise ValueError(
                f"profile.profile_steps={self.profile.profile_steps} exceeds train.steps="
                f"{self.train.steps} (the probe is the start of shared training)"
            )
        self._check_carried_optimizer()
        prune = self.prune
        if prune.enabled and prune.proxy == "llm" and not prune.llm_url:
            raise ValueError("prune.proxy=llm needs prune.llm_url (an OpenAI-compatible http(s) endpoint)")
        if prune.llm_url is not None and not re.match(r"https?://[^\s/]", prune.llm_url):
            raise ValueError(
                f"prune.llm_url={prune.llm_url!r} is not an http(s) URL; allowed: http://... or https://..."
            )
        return self

    def _check_carried_optimizer(self) -> None:
        if self.finetune.optimizer == "shared" and (self.finetune.init == "scratch" or self.train.init_from):
            why = ("finetune.init=scratch starts each expert from scratch" if self.finetune.init == "scratch"
                   else "an imported IDDPM checkpoint (train.init_from) holds no optimizer state")
            raise ValueError(f"finetune.optimizer=shared needs the shared model's optimizer state, but {why}; "
                             f"allowed: finetune.optimizer=fresh")

    def _check_attention_heads(self) -> None:
        """Every attention block's width must split evenly into its heads (else the UNet
        cannot be built, which would only show once training starts)."""
        m = self.model
        widths = {m.base_channels * m.channel_mult[-1]}  # the middle block always has attention
        for level, mult in enumerate(m.channel_mult):
            if self.data.image_size // 2**level in m.attention_resolutions:
                widths.add(m.base_channels * mult)
        for width in sorted(widths):
            heads = max(1, width // m.num_head_channels) if m.num_head_channels else m.num_heads
            if width % heads:
                setting = (f"model.num_head_channels={m.num_head_channels} gives {heads} heads"
                           if m.num_head_channels else f"model.num_heads={heads}")
                raise ValueError(
                    f"{setting} for an attention block {width} channels wide (model.base_channels x "
                    f"model.channel_mult), which they do not divide; allowed: head counts dividing every "
                    f"attention width {sorted(widths)}"
                )

    @property
    def in_channels(self) -> int:
        return self.data.channels

    @property
    def learn_sigma(self) -> bool:
        return self.diffusion.loss == "hybrid"


# --- presets -------------------------------------------------------------------------------
# Each preset is a nested dict of overrides on the defaults above.

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: for tests only; samples are not meant to look like anything.
    "smoke": {
        "data": {"source": "digits", "image_size": 8, "channels": 1, "max_images": 256},
        "model": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attention_resolutions": [4], "num_heads": 2, "norm_groups": 8},
        "diffusion": {"schedule": "cosine", "num_timesteps": 100},
        "train": {"steps": 20, "batch_size": 16, "lr": 1e-3, "ema_decay": 0.9, "log_every": 5,
                  "checkpoint_every": 10, "heldout_every": 10, "heldout_batches": 1},
        "sample": {"sampler": "ddim", "steps": 10, "num_samples": 16, "batch_size": 16},
        "profile": {"profile_steps": 10, "num_buckets": 10, "loss_samples_per_bucket": 16,
                    "affinity_batches": 2, "affinity_batch_size": 8},
        "grouping": {"num_groups": 3},
        "finetune": {"steps": 10},
        # width_multiple 1: its 16-wide blocks would otherwise have two widths left (8 and 16).
        "prune": {"rounds": 2, "candidates_per_round": 3, "recovery_steps": 2, "score_batches": 1,
                  "width_multiple": 1},
        # 10 held-out triples and 10 bits/dim draws per image instead of 100 each: scoring every
        # model of a run (TDC, shared, baseline, the curve's points) was most of a smoke run's time.
        "eval": {"num_samples": 64, "seeds": [0, 1], "batch_size": 64, "heldout_per_image": 10,
                 "bpd_timesteps": 10},
    },
    # The embedded default: scikit-learn's 8x8 digits, a few minutes on 2 CPU cores.
    "digits": {
        # 1 residual block per level and batch 64: recognisable digits in a few minutes on
        # 2 cores, and the whole pipeline (TDC + an equal-cost baseline) in about 10.
        "data": {"source": "digits", "image_size": 8, "channels": 1},
        "model": {"base_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                  "attention_resolutions": [4], "num_heads": 4, "norm_groups": 8},
        "diffusion": {"schedule": "cosine", "num_timesteps": 1000},
        "train": {"steps": 1200, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100,
                  "ema_decay": 0.995, "log_every": 50, "checkpoint_every": 250,
                  "heldout_every": 250},
        "sample": {"sampler": "ddim", "steps": 50, "num_samples": 64},
        "profile": {"profile_steps": 300, "num_buckets": 50},
        "grouping": {"num_groups": 5},
        # Budgets ranked by the measured rise of the probe's error when pruned, chosen on
        # validation seeds 100-102 (studies/SELECTION.md, digits-levers-validation).
        "budget": {"difficulty": "sensitivity"},
        # Stage 2's own schedule, chosen on validation seeds 100-102 (studies/SELECTION.md):
        # inheriting train's 100-step warm-up and EMA 0.995 cost TDC 0.14 bits/dim.
        "finetune": {"steps": 150, "lr": 5e-4, "warmup_steps": 10, "ema_decay": 0.95, "lr_schedule": "cosine"},
        "prune": {"rounds": 3, "candidates_per_round": 6, "recovery_steps": 20, "score_batches": 2},
        # 2,000 samples per seed: FID's bias and spread at 500 were the size of the TDC-baseline gap.
        "eval": {"num_samples": 2000, "seeds": [0, 1, 2], "batch_size": 500},
    },
    # IDDPM CIFAR-10: 128 channels, 3 blocks, (1, 2, 2, 2), dropout 0.3, L_hybrid, T = 4000.
    "cifar10": {
        "data": {"source": "cifar10", "image_size": 32, "channels": 3, "random_flip": True},
        "model": {"base_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 3,
                  "attention_resolutions": [16, 8], "num_heads": 4, "dropout": 0.3},
        "diffusion": {"schedule": "cosine", "num_timesteps": 4000, "loss": "hybrid", "rescale_timesteps": True},
        "train": {"steps": 500_000, "batch_size": 128, "lr": 1e-4, "ema_decay": 0.9999,
                  "grad_clip": None, "log_every": 100, "checkpoint_every": 10_000,
                  "heldout_every": 10_000},
        "sample": {"sampler": "ddpm", "steps": 100, "num_samples": 50_000},
        "profile": {"profile_steps": 20_000, "num_buckets": 50},
        "finetune": {"steps": 50_000, "lr": 1e-4},
    },
    # IDDPM ImageNet-64: 128 channels, 3 blocks, (1, 2, 3, 4), attention at 16 and 8.
    "imagenet64": {
        "data": {"source": "imagenet64", "image_size": 64, "channels": 3, "random_flip": True},
        "model": {"base_channels": 128, "channel_mult": [1, 2, 3, 4], "num_res_blocks": 3,
                  "attention_resolutions": [16, 8], "num_heads": 4, "dropout": 0.0},
        "diffusion": {"schedule": "cosine", "num_timesteps": 4000, "loss": "hybrid", "rescale_timesteps": True},
        "train": {"steps": 1_500_000, "batch_size": 128, "lr": 1e-4, "ema_decay": 0.9999,
                  "grad_clip": None, "log_every": 100, "checkpoint_every": 10_000,
                  "heldout_every": 10_000},
        "sample": {"sampler": "ddpm", "steps": 250, "num_samples": 50_000},
        "profile": {"profile_steps": 50_000, "num_buckets": 50},
        "finetune": {"steps": 100_000, "lr": 1e-4},
    },
}


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError, RecursionError) as exc:
        # YAML's messages span several lines (context, marks): fold them into one.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"config file {path} cannot be parsed as {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (``1e-3`` → float)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    dotted, raw = override.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"override {override!r} has an empty key")
    # Walk the schema, not just the dict, so an unknown key is named with what is allowed.
    model: type[BaseModel] = PipelineConfig
    node = tree
    for depth, key in enumerate(keys):
        if key not in model.model_fields:
            where = ".".join(keys[:depth]) or "top level"
            raise ConfigError(
                f"unknown config key {'.'.join(keys[: depth + 1])!r} in override {override!r}; "
                f"allowed at {where}: {', '.join(_allowed_keys(model))}"
            )
        if depth == len(keys) - 1:
            break
        annotation = model.model_fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"config key {'.'.join(keys[: depth + 1])!r} is not a section")
        model = annotation
        if not isinstance(node.get(key, {}), dict):
            # An earlier override or the file set the whole section to a non-mapping value.
            raise ConfigError(
                f"override {override!r}: {'.'.join(keys[: depth + 1])} is {node[key]!r}, not a section; "
                f"allowed: a mapping of its fields"
            )
        node = node.setdefault(key, {})
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node[keys[-1]] = value


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent_model: type[BaseModel] = PipelineConfig
            for part in err["loc"][:-1]:
                ann = parent_model.model_fields.get(str(part))
                if ann is None or not (isinstance(ann.annotation, type) and issubclass(ann.annotation, BaseModel)):
                    break
                parent_model = ann.annotation
            msg = f"unknown key; allowed: {', '.join(_allowed_keys(parent_model))}"
            lines.append(f"{loc}: {msg}")
            continue
        got = err.get("input")
        # Our own checks (value_error) already name the value.
        shown = "" if isinstance(got, dict) or loc == "" or err["type"] == "value_error" else f" (got {_short(got)})"
        lines.append(f"{loc + ': ' if loc else ''}{msg}{shown}")
    # One line, so that the CLI prints one line per bad input (several errors joined by "; ").
    return f"invalid configuration ({source}): " + "; ".join(" ".join(line.split()) for line in lines)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_config(
    *,
    preset: str = "digits",
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> PipelineConfig:
    """Build the pipeline config: preset, then file, then dotted overrides (later wins).

    Raises:
        ConfigError: unknown preset or key, unparsable file, or an invalid value; the message
            names the dotted field, the value and what is allowed.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    tree = _deep_merge({"preset": preset}, PRESETS[preset])
    source = f"preset {preset!r}"
    if path is not None:
        tree = _deep_merge(tree, _read_file(Path(path)))
        source += f" + file {path}"
    for override in overrides:
        _apply_override(tree, override)
    if overrides:
        source += " + overrides"
    return validate_config(tree, source=source)


def validate_config(tree: dict[str, Any], *, source: str = "config") -> PipelineConfig:
    """Validate a nested dict (e.g. read back from a checkpoint) into a PipelineConfig."""
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def apply_overrides(config: PipelineConfig, overrides: Sequence[str], *, source: str = "config") -> PipelineConfig:
    """``config`` with dotted ``key=value`` overrides on top, validated like :func:`load_config`'s.

    Raises:
        ConfigError: an unknown key or an invalid value (named, with what is allowed).
    """
    if not overrides:
        return config
    tree = config.model_dump(mode="json")
    for override in overrides:
        _apply_override(tree, override)
    return validate_config(tree, source=f"{source} + overrides")


# Sections that never change what is trained: evaluation settings (and, for a checkpoint, how it
# is sampled). Changing them re-evaluates a run without retraining it.
_NOT_TRAINING = ("eval", "sample", "orchestration")


def config_key(config: PipelineConfig) -> str:
    """Short hash of the resolved config without its ``eval`` section: names the default run
    folder and keys the MLflow runs, so changing an ``eval.*`` setting re-evaluates the same run."""
    return hashlib.sha256(config.model_dump_json(exclude={"eval", "orchestration"}).encode()).hexdigest()[:10]


# What stage 1 (the probe, its profile and the shared model) reads: two configs equal here share
# one stage-1 folder, whatever their stage-2 settings (grouping, budget, prune, finetune, baseline).
STAGE1_SECTIONS = ("data", "model", "diffusion", "train", "profile")
# What a dense training run (probe, shared model, baseline) reads, less its length under a
# constant schedule: a run of more steps then continues a shorter one exactly.
_DENSE_SECTIONS = ("data", "model", "diffusion", "train")


def stage1_key(config: PipelineConfig) -> str:
    """Short hash of the config fields stage 1 reads (:data:`STAGE1_SECTIONS`): names the
    stage-1 folder that every run with these fields shares."""
    return hashlib.sha256(config.model_dump_json(include=set(STAGE1_SECTIONS)).encode()).hexdigest()[:10]


def same_training(saved: dict[str, Any], config: PipelineConfig, *, source: str = "checkpoint",
                  dense: bool = False) -> bool:
    """Whether a config stored in a checkpoint (as a dict) trains what ``config`` trains: equal
    after validation (fields added since it was written take their defaults), ignoring the
    sections that do not affect training (``eval``, ``sample``). For a ``dense`` run (all
    timesteps, the ``train`` recipe) only what it reads counts, its length aside, so one shared
    model serves every stage-2 variant and a longer run (the baseline) may continue it; not so
    under ``train.lr_schedule=cosine``, whose every step depends on the run's length."""
    stored = validate_config(saved, source=source)
    if dense:
        def view(c: PipelineConfig) -> dict[str, Any]:
            d = c.model_dump(mode="json", include=set(_DENSE_SECTIONS))
            if c.train.length_free:
                d["train"].pop("steps")
            return d
        return view(stored) == view(config)
    return (stored.model_dump(mode="json", exclude=set(_NOT_TRAINING))
            == config.model_dump(mode="json", exclude=set(_NOT_TRAINING)))


def flatten(config: BaseModel, *, prefix: str = "") -> dict[str, str]:
    """Dotted ``section.field -> str(value)`` pairs, e.g. for MLflow params."""
    out: dict[str, str] = {}
    for key, value in config.model_dump(mode="json").items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, str], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for sub, v in value.items():
            _flatten_into(out, f"{key}.{sub}", v)
    else:
        out[key] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def write_run_config(layout, config: PipelineConfig) -> None:
    """Save the resolved config as the run folder's ``config.yaml`` (atomically)."""
    atomic_write_bytes(layout.config, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())


def read_run_config(layout, *, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The config saved in a run folder, with optional overrides on top."""
    if not layout.config.is_file():
        raise ConfigError(f"run folder {layout.root} has no config.yaml; start it with tdc run/profile/train")
    saved = _read_file(layout.config)
    return load_config(preset=str(saved.get("preset", "digits")), path=layout.config, overrides=overrides)
