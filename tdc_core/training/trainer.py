"""The training loop: ε-prediction (or L_hybrid) with AdamW, EMA, clipping and exact resume.

One :class:`Trainer` serves every training stage of the pipeline: the single-model baseline,
the shared model (stage 1, whose first steps are the difficulty probe) and each group's
fine-tune (stage 2, timesteps restricted to the group's interval ``[lo, hi)``). It is handed
the model to train; the run's config holds the settings every call shares, a small
:class:`TrainPlan` what one call sets itself (seed, interval, learning rate, batch, flips).

Nothing here prints: progress and metrics go to the caller's :class:`Reporter`. Metrics are
fetched from the device only every ``log_every`` steps, so the step itself has no host sync.

Speed (benchmarks/RESULTS.md): bf16 autocast and fused AdamW on CUDA, NHWC (channels_last)
activations on CUDA, optional ``torch.compile`` of the training model, the uint8 dataset held
on the GPU when it fits (batches are gathered there: no host-to-device copy per step), and DDP
under ``torchrun`` (see :mod:`tdc_core.training.distributed`) through the same code path.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tdc_core.config import PipelineConfig, TrainConfig, same_training, validate_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.errors import CheckpointError, TDCError, TrainingError
from tdc_core.model.unet import UNet, UNetSpec
from tdc_core.reporter import NullReporter, Reporter
from tdc_core.run.layout import RunLayout
from tdc_core.training.checkpoint import load_checkpoint, save_checkpoint
from tdc_core.training.data import BatchSampler, load_images, split_heldout, to_model_range
from tdc_core.training.device import autocast_dtype, peak_memory_gib, reset_peak_memory, resolve_device
from tdc_core.training.distributed import DistInfo, all_gather_objects, init_distributed, mean_across_ranks
from tdc_core.training.import_iddpm import imported_checkpoint

__all__ = ["TrainPlan", "TrainResult", "Trainer", "init_model", "load_model", "run_training", "spec_for"]



@dataclass(frozen=True)
class TrainResult:
    step: int                    # optimizer steps done in total (incl. before a resume)
    checkpoint: Path             # the final checkpoint
    train_loss: float            # mean training loss over the last logging window
    heldout_loss: float          # EMA model's held-out ε-MSE on the trained interval
    initial_heldout_loss: float  # the same, before this call's first step
    seconds: float               # wall time of this call
    resumed_from: int            # step the call started from (0 = fresh)
    peak_memory_gib: float | None = None  # peak CUDA memory of the call (None on CPU)


def spec_for(config: PipelineConfig) -> UNetSpec:
    """The dense UNet of a pipeline config."""
    T = config.diffusion.num_timesteps
    return UNetSpec(model=config.model, image_size=config.data.image_size,
                    in_channels=config.data.channels, learn_sigma=config.learn_sigma,
                    time_scale=1000.0 / T if config.diffusion.rescale_timesteps else 1.0)


def init_model(spec: UNetSpec, *, seed: int) -> UNet:
    """A freshly initialised UNet whose weights depend on ``seed`` alone (torch's global RNG is
    left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet(spec)


@dataclass(frozen=True)
class TrainPlan:
    """What one training call does beyond the run's shared ``train`` settings.

    Everything else (device, precision, optimizer, EMA, clipping, warm-up, cadences) comes from
    the pipeline config's ``train`` section, the same for every call of a run.
    """

    seed: int                  # data order, timesteps, noise and dropout (per rank, see Trainer)
    t_range: tuple[int, int]   # timesteps trained on, [lo, hi)
    lr: float
    batch_size: int            # the global batch, split evenly over the processes of a torchrun job
    random_flip: bool = False  # horizontal flips of the training images
    # The ``train`` recipe on all timesteps (probe, shared model, baseline): its checkpoints
    # resume under any config that trains the same, whatever its length (``same_training``).
    is_dense: bool = False
    warmup_steps: int = 0              # linear learning-rate warm-up
    ema_decay: float = 0.999           # EMA of the weights, per step
    cosine_steps: int | None = None    # cosine decay of the learning rate to 0 at this step; None: constant
    min_snr_gamma: float | None = None  # weight the ε-MSE by min(SNR, γ)/SNR; None: uniform

    def __post_init__(self) -> None:
        lo, hi = self.t_range
        object.__setattr__(self, "t_range", (int(lo), int(hi)))

    @classmethod
    def dense(cls, config: PipelineConfig) -> TrainPlan:
        """All timesteps with ``train``'s seed, learning rate, batch and schedule: the probe, the
        shared model and the baseline (a cosine spans ``train.steps``: the probe is the start of the
        shared model's schedule, the baseline's config sets its own length)."""
        return cls(seed=config.train.seed, t_range=(0, config.diffusion.num_timesteps), lr=config.train.lr,
                   batch_size=config.train.batch_size, random_flip=config.data.random_flip, is_dense=True,
                   warmup_steps=config.train.warmup_steps, ema_decay=config.train.ema_decay,
                   cosine_steps=config.train.steps if config.train.lr_schedule == "cosine" else None,
                   min_snr_gamma=_gamma(config.train.loss_weighting, config))

    @classmethod
    def finetune(cls, config: PipelineConfig, *, t_range: tuple[int, int], seed: int, steps: int) -> TrainPlan:
        """A fine-tune of ``steps`` steps on ``t_range`` (a group's, or a pruning round's recovery)
        with stage 2's recipe: ``finetune``'s learning rate, batch (default ``train.batch_size``),
        warm-up and EMA decay (default ``train``'s), and its schedule over those ``steps``."""
        ft = config.finetune
        return cls(seed=seed, t_range=t_range, lr=ft.lr, batch_size=ft.batch_size or config.train.batch_size,
                   random_flip=config.data.random_flip,
                   warmup_steps=config.train.warmup_steps if ft.warmup_steps is None else ft.warmup_steps,
                   ema_decay=config.train.ema_decay if ft.ema_decay is None else ft.ema_decay,
                   cosine_steps=steps if ft.lr_schedule == "cosine" else None,
                   min_snr_gamma=_gamma(ft.loss_weighting or config.train.loss_weighting, config))

    def replace(self, **changes: Any) -> TrainPlan:
        return dataclasses.replace(self, **changes)


def _gamma(weighting: str, config: PipelineConfig) -> float | None:
    return config.train.min_snr_gamma if weighting == "min_snr" else None


class Trainer:
    """Trains ``model`` on timesteps ``plan.t_range`` of ``diffusion``.

    Args:
        model: the UNet to train (any widths): :func:`init_model`, or a shared or pruned model to
            fine-tune. The trainer takes it over: moves it to its device and memory format, makes it
            trainable and trains it in place (pass a copy to keep the original).
        ema: the EMA to start from (default a copy of ``model``); taken over likewise, frozen.
        config: the resolved pipeline config; its ``train`` section holds the settings every call
            shares, and it is stored inside every checkpoint.
        plan: this call's seed, timestep interval, learning rate, batch and flips (default
            :meth:`TrainPlan.dense`).
        train_images, heldout_images: uint8 ``[N x C x H x W]``.
        dist: this process's rank (default: from torchrun's environment, else rank 0 of 1).
    """

    def __init__(
        self, *, model: UNet, diffusion: Diffusion, config: PipelineConfig, train_images: torch.Tensor,
        heldout_images: torch.Tensor, plan: TrainPlan | None = None, ema: UNet | None = None,
        device: torch.device | None = None, dist: DistInfo | None = None,
    ) -> None:
        train = config.train
        self.diffusion, self.config, self.plan = diffusion, config, plan or TrainPlan.dense(config)
        self.spec: UNetSpec = model.spec
        if ema is not None and ema.spec != self.spec:
            raise ValueError("the EMA's architecture differs from the model's")
        self.device = device or resolve_device(train.device)
        self.dist = dist or init_distributed(device_type=self.device.type)
        if self.dist.enabled and self.device.type == "cuda":  # one GPU per process
            self.device = torch.device("cuda", self.dist.local_rank)
        self.amp_dtype = autocast_dtype(train.precision, self.device)
        lo, hi = self.plan.t_range
        if not 0 <= lo < hi <= diffusion.num_steps:
            raise ValueError(f"t_range {self.plan.t_range} must lie within [0, {diffusion.num_steps})")
        world = self.dist.world_size
        if self.plan.batch_size % world:
            raise ValueError(f"batch size {self.plan.batch_size} is not divisible by the {world} processes of this job")
        self.local_batch = self.plan.batch_size // world
        self.heldout_images = heldout_images
        nhwc = train.channels_last if train.channels_last is not None else self.device.type == "cuda"
        self.memory_format = torch.channels_last if nhwc else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).requires_grad_(True)
        self.model.zero_grad(set_to_none=True)
        ema = ema.to(self.device, memory_format=self.memory_format) if ema is not None else copy.deepcopy(self.model)
        self.ema = ema.requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.plan.lr, weight_decay=train.weight_decay,
            fused=self.device.type == "cuda",
        )
        # What runs the training forward pass: the model, wrapped for DDP and/or compiled.
        # Weights are shared with self.model, which is what checkpoints hold.
        self.train_model: torch.nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if train.compile:
            self.train_model = torch.compile(self.train_model)
        # Small datasets live on the GPU as uint8 (CIFAR-10: 150 MB; ImageNet-64: 16 GB), so a
        # batch is a gather on the device, never a host-to-device copy in the step.
        self.data_on_device = self.device.type == "cuda" and _fits_on_device(train_images, self.device)
        images = train_images.to(self.device) if self.data_on_device else train_images
        # Rank r draws its own batches and noise; rank 0 draws what a single process would.
        rank_seed = self.plan.seed + 1_000_003 * self.dist.rank
        self.sampler = BatchSampler(images, batch_size=self.local_batch, seed=rank_seed,
                                    random_flip=self.plan.random_flip)
        # Timesteps and noise come from a generator of our own, so resume restores them exactly.
        self.gen = torch.Generator(device=self.device).manual_seed(rank_seed + 1)
        self.skipped_steps = 0  # steps whose update was dropped (train.nonfinite="skip")
        # Dropout draws from torch's global RNG: training runs inside fork_rng with this saved
        # state, so results do not depend on what ran before and resume restores it exactly.
        self._global_rng: dict[str, torch.Tensor] | None = None
        self._in_fit = False
        self.step = 0

    # --- state -----------------------------------------------------------------------------

    def _capture_global_rng(self) -> dict[str, torch.Tensor]:
        if not self._in_fit and self._global_rng is not None:
            return self._global_rng
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _enter_global_rng(self) -> None:
        if self._global_rng is None:  # fresh (or re-seeded): per rank, and per start step
            torch.manual_seed(self.plan.seed + 2 + 1_000_003 * self.dist.rank + 7919 * self.step)
        else:
            torch.set_rng_state(self._global_rng["torch"])
            if self.device.type == "cuda" and "cuda" in self._global_rng:
                torch.cuda.set_rng_state(self._global_rng["cuda"], self.device)

    def _rng_state(self) -> dict[str, Any]:
        return {**self._capture_global_rng(), "gen": self.gen.get_state(), "sampler": self.sampler.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. Under torchrun every rank's RNG state is gathered, so
        a collective: all ranks must call it together."""
        ranks = all_gather_objects(self._rng_state(), info=self.dist)
        return {
            "kind": "train", "config": self.config.model_dump(mode="json"), "spec": self.spec.to_dict(),
            "t_range": list(self.plan.t_range), "step": self.step, "lr": self.plan.lr,
            "batch_size": self.plan.batch_size,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": ranks[0],
            "world_size": self.dist.world_size, "rng_ranks": ranks if self.dist.enabled else [],
            "skipped_steps": self.skipped_steps,
        }

    def save(self, path: str | Path) -> None:
        """Write a checkpoint (rank 0 writes; every rank must call it: the RNG gather)."""
        state = self.state_dict()
        if self.dist.is_main:
            save_checkpoint(path, state)

    def save_snapshot(self, path: str | Path) -> None:
        """Keep the EMA weights alone (no optimiser or RNG state: a point to evaluate, not to
        resume), loadable with :func:`load_model`."""
        save_checkpoint(path, {"kind": "snapshot", "config": self.config.model_dump(mode="json"),
                               "spec": self.spec.to_dict(), "t_range": list(self.plan.t_range), "step": self.step,
                               "ema": self.ema.state_dict()})

    def resume(self, path: str | Path) -> None:
        """Restore everything (weights, EMA, optimizer, step, RNG states) from ``path``.

        Raises:
            CheckpointError: the checkpoint is unreadable or was written for another
                architecture, timestep interval or config.
        """
        p = load_checkpoint(path, map_location="cpu")
        try:
            self._restore(p, path)
        except CheckpointError:
            raise
        except _REBUILD_ERRORS as exc:  # an edited or foreign checkpoint: name the file, one line
            raise CheckpointError(f"checkpoint {path} is inconsistent: {_one_line(exc)}") from None

    def carry_optimizer_state(self, saved: Mapping[str, Any] | None, *, source: str | Path) -> tuple[int, int]:
        """Start AdamW from ``saved``, the optimizer state of the training checkpoint ``source``
        (the shared model's; see :func:`load_model`'s ``keep_optimizer``): each parameter of this
        trainer's model whose shape is the checkpoint's takes that parameter's moments and step
        count; any other (a pruned tensor, whose channels no longer line up) starts fresh. A
        pruned model keeps the dense model's modules, so its parameters come in the same order.
        Weights, EMA, step and RNG are untouched: this is a new run that inherits only the
        optimizer's statistics.

        Returns:
            (parameters carried, parameters of the model).

        Raises:
            CheckpointError: ``source`` holds no optimizer state (an imported checkpoint).
        """
        if saved is None:
            raise CheckpointError(f"checkpoint {source} holds no optimizer state to carry (imported weights?)")
        params = list(self.model.parameters())
        mine = self.optimizer.state_dict()
        # torch's load_state_dict puts each state on its parameter's device and dtype (and AdamW's
        # step where fused/capturable AdamW wants it), as a resume does.
        mine["state"] = {i: st for i, st in saved["state"].items()
                         if int(i) < len(params) and tuple(st["exp_avg"].shape) == tuple(params[int(i)].shape)}
        self.optimizer.load_state_dict(mine)
        return len(mine["state"]), len(params)

    def _restore(self, p: dict[str, Any], path: str | Path) -> None:
        if p.get("kind") != "train":
            raise CheckpointError(f"checkpoint {path} is not a training checkpoint")
        if p["spec"] != self.spec.to_dict() or _t_range(p["t_range"]) != self.plan.t_range:
            raise CheckpointError(
                f"checkpoint {path} was written for a different model or timestep interval; "
                f"use a new run folder or delete it"
            )
        if not same_training(p["config"], self.config, source=f"checkpoint {path}", dense=self.plan.is_dense):
            raise CheckpointError(
                f"checkpoint {path} was written with a different config; resume needs the same "
                f"config (use a new run folder to start afresh)"
            )
        self.model.load_state_dict(p["model"])
        self.ema.load_state_dict(p["ema"])
        if p["optimizer"] is not None:  # None: imported weights (import_iddpm), AdamW starts afresh
            self.optimizer.load_state_dict(p["optimizer"])
        self.step = int(p["step"])
        self.skipped_steps = int(p.get("skipped_steps", 0))
        saved_world = int(p.get("world_size", 1))
        if saved_world == self.dist.world_size and p["rng"] is not None:  # exact continuation
            rng = p["rng_ranks"][self.dist.rank] if self.dist.enabled else p["rng"]
            self._global_rng = {k: rng[k] for k in ("torch", "cuda") if k in rng}
            self.gen.set_state(rng["gen"].to(torch.uint8).cpu())
            self.sampler.load_state_dict(rng["sampler"])
        else:
            # Another process count (e.g. the single-process probe continued by DDP), or imported
            # weights without RNG state: weights, optimizer and step carry over; data order and
            # noise are re-seeded from (seed, rank, step), so no rank replays the batches of step 0.
            seed = self.plan.seed + 1_000_003 * self.dist.rank + 7919 * self.step
            self.sampler = BatchSampler(self.sampler.images, batch_size=self.local_batch, seed=seed,
                                        random_flip=self.sampler.random_flip)
            self.gen.manual_seed(seed + 1)
            self._global_rng = None

    # --- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def heldout_loss(self, model: torch.nn.Module | None = None) -> float:
        """Mean ε-MSE of ``model`` (default the EMA; any width, e.g. the model a fine-tune started
        from) on held-out images with t uniform on the plan's ``t_range``.

        Uses a fixed generator, so successive calls measure the same (images, t, ε) triples
        and differences are due to the model alone.
        """
        model = self.ema if model is None else model
        was_training = model.training
        model.eval()
        g = torch.Generator(device="cpu").manual_seed(12345)
        lo, hi = self.plan.t_range
        n, batch = self.heldout_images.shape[0], self.plan.batch_size
        total, count = 0.0, 0
        for b in range(self.config.train.heldout_batches):
            idx = torch.arange(b * batch, (b + 1) * batch) % n
            x0 = to_model_range(self.heldout_images[idx]).to(self.device)
            t = torch.randint(lo, hi, (len(idx),), generator=g).to(self.device)
            noise = torch.randn(x0.shape, generator=g).to(self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss = self.diffusion.eps_loss(model, x0, t, noise)
            total += float(loss.sum())
            count += len(idx)
        model.train(was_training)
        return total / count

    # --- the loop ----------------------------------------------------------------------------

    def _lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up over
        ``plan.warmup_steps``, then constant or, with ``plan.cosine_steps``, a cosine to 0 there."""
        warm, lr = self.plan.warmup_steps, self.plan.lr
        if warm and step < warm:
            return lr * (step + 1) / warm
        if self.plan.cosine_steps:
            span = max(1, self.plan.cosine_steps - warm)
            return lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))
        return lr

    def _train_step(self) -> dict[str, torch.Tensor] | None:
        """One optimizer step; the step's metrics as device tensors (no host sync), or None
        when ``train.nonfinite="skip"`` dropped a non-finite update."""
        x0 = self.sampler.next_batch().to(self.device, non_blocking=True)
        x0 = x0.contiguous(memory_format=self.memory_format)
        lo, hi = self.plan.t_range
        t = torch.randint(lo, hi, (x0.shape[0],), generator=self.gen, device=self.device)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(self.step)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            x_t = self.diffusion.q_sample(x0, t, noise)
            out = self.train_model(x_t, self.diffusion.model_timesteps(t))
        weight = None if self.plan.min_snr_gamma is None else self.diffusion.min_snr_weight(
            t, gamma=self.plan.min_snr_gamma)
        losses = self.diffusion.training_losses(out, x0=x0, x_t=x_t, t=t, noise=noise, mse_weight=weight)
        loss = losses["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        train = self.config.train
        clip = train.grad_clip if train.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.step += 1
        # The norm is of all-reduced gradients, so every rank takes the same decision.
        if train.nonfinite == "skip" and not bool(torch.isfinite(grad_norm)):  # the one sync
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            if self.skipped_steps > train.max_skipped_steps:
                raise TrainingError(
                    f"{self.skipped_steps} steps with a non-finite loss or gradient (latest: step "
                    f"{self.step}) exceed train.max_skipped_steps={train.max_skipped_steps}"
                )
            return None
        self.optimizer.step()
        self._update_ema()
        return {k: v.detach().mean() for k, v in losses.items()} | {"grad_norm": grad_norm.detach()}

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema_p = list(self.ema.parameters())
        torch._foreach_lerp_(ema_p, list(self.model.parameters()), 1.0 - self.plan.ema_decay)

    def fit(self, *, until_step: int, checkpoint_path: str | Path, reporter: Reporter | None = None,
            snapshot_steps: Sequence[int] = (), snapshot_dir: str | Path | None = None) -> TrainResult:
        """Train until ``self.step == until_step``, checkpointing every ``checkpoint_every``
        steps and at the end (atomically). At each of ``snapshot_steps`` passed on the way, the
        EMA weights are also kept as ``<snapshot_dir>/step-<n>.pt`` (:func:`snapshot_path`), a
        point of the run's quality-vs-compute curve.

        Raises:
            TrainingError: the loss became NaN/inf; names the steps and the last good checkpoint.
        """
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self._enter_global_rng()
            self._in_fit = True
            try:
                snapshots = ({int(n) for n in snapshot_steps}, Path(snapshot_dir)) if snapshot_dir else (set(), None)
                return self._fit(until_step=until_step, checkpoint_path=Path(checkpoint_path),
                                 reporter=reporter or NullReporter(), snapshots=snapshots)
            finally:
                self._global_rng = self._capture_global_rng()
                self._in_fit = False

    def _fit(self, *, until_step: int, checkpoint_path: Path, reporter: Reporter,
             snapshots: tuple[set[int], Path | None]) -> TrainResult:
        start, t0 = self.step, time.perf_counter()
        reset_peak_memory(self.device)
        initial_heldout = self.heldout_loss()
        last_good = checkpoint_path if checkpoint_path.exists() else None
        due = _Cadence(self.config.train, until=until_step)
        window, train_loss = _MetricWindow(batch_size=self.plan.batch_size), float("nan")
        self.model.train()
        reporter.progress(step=self.step, total=until_step)
        if not self.dist.is_main:
            reporter = NullReporter()  # rank 0 speaks for the job
        while self.step < until_step:
            window.add(self._train_step())
            reporter.progress(step=self.step, total=until_step)
            if self.step in snapshots[0] and self.dist.is_main:
                self.save_snapshot(snapshot_path(snapshots[1], self.step))
            if (due.log(self.step) or due.checkpoint(self.step)) and window.steps:
                metrics = self._close_window(window, last_good=last_good)
                reporter.log_metrics(metrics, step=self.step)
                train_loss = metrics["loss"]
            if due.heldout(self.step):
                reporter.log_metrics({"heldout_loss": self.heldout_loss()}, step=self.step)
            if due.checkpoint(self.step):
                last_good = self._checkpoint(checkpoint_path, reporter)
        # Nothing to do (already finished): still leave a checkpoint; under torchrun every rank
        # saves (the save is collective).
        if self.step == start and (self.dist.enabled or not checkpoint_path.exists()):
            self.save(checkpoint_path)
        final_heldout = self.heldout_loss()
        peak = peak_memory_gib(self.device)
        reporter.log_metrics({"heldout_loss": final_heldout,
                              **({"peak_gpu_memory_gib": peak} if peak is not None else {})}, step=self.step)
        return TrainResult(
            step=self.step, checkpoint=checkpoint_path, train_loss=train_loss, heldout_loss=final_heldout,
            initial_heldout_loss=initial_heldout, seconds=time.perf_counter() - t0, resumed_from=start,
            peak_memory_gib=peak,
        )

    def _close_window(self, window: _MetricWindow, *, last_good: Path | None) -> dict[str, float]:
        """The window's metrics, with the learning rate, throughput and skipped steps."""
        values, images_per_sec = window.close(step=self.step, dist=self.dist, device=self.device,
                                              last_good=last_good)
        values["lr"] = self._lr_at(self.step - 1)
        values["images_per_sec"] = images_per_sec
        if self.config.train.nonfinite == "skip":
            values["skipped_steps"] = float(self.skipped_steps)
        return values

    def _checkpoint(self, path: Path, reporter: Reporter) -> Path:
        """Save (every rank calls it) and say so; returns the new last good checkpoint."""
        self.save(path)
        reporter.message(f"checkpoint at step {self.step}: {path}")
        return path


@dataclass(frozen=True)
class _Cadence:
    """What falls due after a step of a call that trains until step ``until``: metrics every
    ``log_every`` steps, a checkpoint every ``checkpoint_every`` (both also at the end), the
    held-out loss every ``heldout_every`` (not at the end: the call measures it then anyway)."""

    train: TrainConfig
    until: int

    def log(self, step: int) -> bool:
        return step % self.train.log_every == 0 or step == self.until

    def checkpoint(self, step: int) -> bool:
        return step % self.train.checkpoint_every == 0 or step == self.until

    def heldout(self, step: int) -> bool:
        return step % self.train.heldout_every == 0 and step != self.until


class _MetricWindow:
    """The training metrics of the steps since the last report, summed on the device (no host
    sync per step) and fetched together by :meth:`close`."""

    def __init__(self, *, batch_size: int) -> None:
        self.batch_size = batch_size  # global images per step
        self._sums: dict[str, torch.Tensor] = {}
        self.steps = 0  # steps in the window (a skipped step adds nothing)
        self._t0 = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor] | None) -> None:
        if stats is None:  # an update dropped by train.nonfinite="skip"
            return
        for k, v in stats.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self.steps += 1

    def close(self, *, step: int, dist: DistInfo, device: torch.device,
              last_good: Path | None) -> tuple[dict[str, float], float]:
        """The window's mean metrics (averaged across ranks) and images/s; starts the next window.

        Raises:
            TrainingError: a metric is NaN/inf on some rank; names the steps and ``last_good``.
        """
        # One host sync per window: fetch all accumulated metrics together.
        values = {k: float(v) / self.steps for k, v in self._sums.items()}
        # Averaged first: a NaN on one rank is then a NaN on all, and all stop together.
        values = mean_across_ranks(values, info=dist, device=device)
        if not all(map(_finite, values.values())):
            raise TrainingError(
                f"non-finite training loss between steps {step - self.steps + 1} and "
                f"{step}; last good checkpoint: {last_good or 'none written yet'}"
            )
        images_per_sec = self.steps * self.batch_size / max(time.perf_counter() - self._t0, 1e-9)
        self._sums, self.steps, self._t0 = {}, 0, time.perf_counter()
        return values, images_per_sec


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _fits_on_device(images: torch.Tensor, device: torch.device) -> bool:
    """Whether the uint8 dataset takes under a quarter of the GPU's free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() < free // 4


# --- whole-run helpers -------------------------------------------------------------------------


def prepare_data(config: PipelineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the dataset and split it into (train, held-out) uint8 tensors."""
    images = load_images(config.data)
    return split_heldout(images, fraction=config.data.heldout_fraction, seed=config.data.split_seed)


def snapshot_path(folder: str | Path, step: int) -> Path:
    """``<folder>/step-<step>.pt``: the EMA weights of a run at ``step``."""
    return Path(folder) / f"step-{int(step)}.pt"


def list_snapshots(folder: str | Path) -> list[tuple[int, Path]]:
    """``(step, file)`` of the snapshots :func:`snapshot_path` named in ``folder``, by step."""
    found = []
    for p in Path(folder).glob("step-*.pt"):
        try:
            found.append((int(p.stem.removeprefix("step-")), p))
        except ValueError:
            continue
    return sorted(found)


def run_training(
    config: PipelineConfig, *, run_dir: str | Path, reporter: Reporter | None = None, steps: int | None = None,
    resume: bool = True, device: torch.device | None = None, snapshot_steps: Sequence[int] = (),
) -> TrainResult:
    """Train the dense model of ``config`` on all timesteps to ``steps`` (default
    ``train.steps``), resuming from ``run_dir/checkpoints/last.pt`` when it exists; the EMA
    weights at ``snapshot_steps`` go to ``run_dir/snapshots/``."""
    run_dir = Path(run_dir)
    train_images, heldout = prepare_data(config)
    trainer = Trainer(
        model=init_model(spec_for(config), seed=config.train.seed), diffusion=Diffusion.from_config(config.diffusion),
        config=config, plan=TrainPlan.dense(config), train_images=train_images, heldout_images=heldout, device=device,
    )
    ckpt = RunLayout(run_dir).shared_checkpoint
    if resume and config.train.init_from is not None and not ckpt.exists():
        # Stage 1 imported, not trained: the run starts at train.steps with IDDPM's weights.
        (reporter or NullReporter()).message(f"importing the IDDPM checkpoint {config.train.init_from} "
                                             f"as step {config.train.steps} of this run")
        save_checkpoint(ckpt, imported_checkpoint(config, config.train.init_from, spec=spec_for(config)))
    if resume and ckpt.exists():
        trainer.resume(ckpt)
    return trainer.fit(until_step=config.train.steps if steps is None else steps, checkpoint_path=ckpt,
                       reporter=reporter, snapshot_steps=snapshot_steps, snapshot_dir=RunLayout(run_dir).snapshots_dir)


@dataclass
class LoadedModel:
    model: UNet
    config: PipelineConfig
    spec: UNetSpec
    step: int
    t_range: tuple[int, int]
    # AdamW's state in the checkpoint (on CPU), only when asked for: it is twice the weights.
    optimizer_state: dict[str, Any] | None = None


def load_model(path: str | Path, *, use_ema: bool = True, device: torch.device | str = "cpu",
               keep_optimizer: bool = False) -> LoadedModel:
    """Rebuild a model from its checkpoint alone (config and spec are stored inside); with
    ``keep_optimizer``, also return the checkpoint's optimizer state (None in an imported one),
    so a caller that needs both reads the file once."""
    p = load_checkpoint(path, map_location="cpu")
    try:
        config = validate_config(p["config"], source=f"checkpoint {path}")
        spec = UNetSpec.from_dict(p["spec"])
        model = UNet(spec)
        model.load_state_dict(p["ema" if use_ema else "model"])
        step, t_range = int(p["step"]), _t_range(p["t_range"])
    except _REBUILD_ERRORS as exc:  # an edited or foreign checkpoint: name the file, one line
        raise CheckpointError(f"checkpoint {path} cannot be rebuilt: {_one_line(exc)}") from None
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, config=config, spec=spec, step=step, t_range=t_range,
                       optimizer_state=p.get("optimizer") if keep_optimizer else None)


# ValueError covers pydantic's ValidationError; TDCError our ConfigError and DataError.
_REBUILD_ERRORS = (TDCError, KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError)


def _t_range(value: Any) -> tuple[int, int]:
    lo, hi = (int(v) for v in value)
    return lo, hi


def _one_line(exc: BaseException) -> str:
    """An exception as one line: state-dict errors put their substance after the first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
