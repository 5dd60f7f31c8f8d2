"""Progressive, proxy-guided pruning of one group's model to its FLOPs budget (docs/METHOD.md step 5).

:func:`prune_to_budget` runs R rounds; round r targets ``F − (F − budget)·r/R`` (F: the dense
model's FLOPs). In each round:

1. channel importance (magnitude or Taylor on the group's timesteps) of the current model;
2. the proxy proposes ``candidates_per_round`` keep-ratio vectors for the round's target, given
   the memory bank (:mod:`tdc_core.method.pruning.proxies`);
3. each candidate is pruned from the current model (:func:`tdc_core.method.pruning.surgery.prune_to_widths`)
   and scored: mean ε-MSE on ``score_batches`` fixed held-out batches with t uniform in the
   group's interval; the same (image, t, ε) triples for every candidate and round (common random
   numbers), so score differences are due to the models alone;
4. the best-scoring candidate is accepted and fine-tuned for ``recovery_steps`` on the group's
   timesteps (:class:`~tdc_core.training.trainer.Trainer`); of the trainer's raw and EMA weights, the one
   with the lower score continues (with few steps the EMA is mostly the pre-recovery model);
5. the memory bank records every candidate and the round's decision.

The final model's FLOPs are counted with ``FlopCounterMode`` and lie at most ``tolerance`` above
the budget (the projection never exceeds a round's target by more). The search's own compute
(scoring forwards, Taylor backwards, recovery training and its evaluations) is returned in FLOPs
for the cost report.

:func:`search_rounds` is the model-free loop (proxy → evaluate → accept → recover), used by
:func:`prune_to_budget` and directly by tests with a synthetic score.
"""

from __future__ import annotations

import copy
import io
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tdc_core.atomic import atomic_write_bytes
from tdc_core.config import PipelineConfig, PruneConfig
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.errors import ConfigError
from tdc_core.method.pruning.importance import ChannelScores, channel_importance
from tdc_core.method.pruning.proxies.base import Proxy
from tdc_core.method.pruning.proxies.factory import make_proxy
from tdc_core.method.pruning.proxies.records import MemoryBank, MemoryEntry, Proposal, ProxyState, RoundRecord
from tdc_core.method.pruning.space import PruneSpace, prune_space
from tdc_core.method.pruning.surgery import prune_to_widths
from tdc_core.model.flops import count_forward_flops
from tdc_core.model.unet import UNet, UNetSpec
from tdc_core.reporter import NullReporter, Reporter
from tdc_core.training.data import to_model_range
from tdc_core.training.device import autocast_dtype
from tdc_core.training.trainer import Trainer, TrainPlan

__all__ = [
    "Batch",
    "PruneResult",
    "RecoveryOutcome",
    "eps_score",
    "fixed_batches",
    "plot_prune_rounds",
    "prune_to_budget",
    "round_targets",
    "search_rounds",
]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x0 [B x C x H x W] in [-1, 1], t [B], ε like x0


# --- the model-free loop ---------------------------------------------------------------------------


def round_targets(*, dense_flops: float, budget_flops: float, rounds: int) -> list[float]:
    """``[R]`` FLOPs targets ``F − (F − budget)·r/R``, r = 1..R; the last is exactly the budget."""
    return [dense_flops - (dense_flops - budget_flops) * r / rounds for r in range(1, rounds)] + [float(budget_flops)]


@dataclass(frozen=True)
class RecoveryOutcome:
    """What accepting a candidate led to: the accepted model's counted FLOPs and, after a
    recovery fine-tune, its score (None without recovery)."""

    flops: float
    recovered_score: float | None
    recovery_steps: int


def search_rounds(
    *, space: PruneSpace, memory: MemoryBank, current_widths: list[int], lower_widths: list[int],
    budget_flops: float, prune: PruneConfig, proxy: Proxy,
    evaluate: Callable[[int, list[Proposal]], list[float]],
    accept: Callable[[int, Proposal], RecoveryOutcome],
    reporter: Reporter | None = None,
) -> list[int]:
    """Run ``prune.rounds`` rounds of propose → evaluate → accept; returns the final widths ``[U]``.

    Args:
        space: unit table and FLOPs model; ``memory`` is appended to (entries and rounds).
        current_widths, lower_widths: ``[U]`` the starting widths and the smallest allowed ones
            (equal for units that must not change).
        evaluate: ``(round, proposals) -> scores`` (lower is better), one per proposal.
        accept: ``(round, accepted proposal) -> RecoveryOutcome``; makes it the current model.
    """
    reporter = reporter or NullReporter()
    dense = space.dense_flops
    targets = round_targets(dense_flops=dense, budget_flops=budget_flops, rounds=prune.rounds)
    current = list(current_widths)
    reporter.progress(step=0, total=prune.rounds)
    for r, target in enumerate(targets, start=1):
        state = ProxyState(
            round=r, rounds=prune.rounds, space=space, current_widths=current,
            lower_widths=[min(lo, c) for lo, c in zip(lower_widths, current)], target_flops=target,
            budget_flops=budget_flops, tolerance=prune.tolerance, num_candidates=prune.candidates_per_round,
            seed=prune.seed,
        )
        # prune.memory=false (ablation): the proxy sees no earlier candidate; the record still keeps all.
        seen = memory if prune.memory else memory.model_copy(update={"entries": [], "rounds": []})
        proposals = proxy.propose(state, seen)
        if not proposals:
            raise RuntimeError(f"proxy {proxy.name!r} proposed no candidate in round {r}")
        scores = [float(s) for s in evaluate(r, proposals)]
        # Lowest score wins; a NaN never does; ties go to the earlier candidate.
        best = min(range(len(scores)), key=lambda i: (not math.isfinite(scores[i]), scores[i], i))
        for i, (p, s) in enumerate(zip(proposals, scores)):
            memory.entries.append(MemoryEntry(
                round=r, candidate=i, proxy=p.proxy, proposal=p.proposal, keep=p.keep, widths=p.widths,
                flops=p.flops, target_flops=target, score=s if math.isfinite(s) else None,
                accepted=i == best, fallback_reason=p.fallback_reason,
            ))
        outcome = accept(r, proposals[best])
        reasons = [p.fallback_reason for p in proposals if p.fallback_reason]
        memory.rounds.append(RoundRecord(
            round=r, target_flops=target, proxy=proxy.name, proxies_used=sorted({p.proxy for p in proposals}),
            fallback_reason=reasons[0] if reasons else None, accepted=best, flops=outcome.flops,
            score=scores[best], recovered_score=outcome.recovered_score, recovery_steps=outcome.recovery_steps,
        ))
        current = list(proposals[best].widths)
        recovered = "" if outcome.recovered_score is None else f", {outcome.recovered_score:.4f} after recovery"
        used = ", ".join(sorted({p.proxy for p in proposals}))
        reporter.message(
            f"prune round {r}/{prune.rounds}: {len(proposals)} candidates ({used}"
            f"{'; fallback: ' + reasons[0] if reasons else ''}), accepted #{best} at {outcome.flops / dense:.3f} F "
            f"(target {target / dense:.3f} F), score {scores[best]:.4f}{recovered}"
        )
        metrics = {"prune_flops_fraction": outcome.flops / dense, "prune_score": scores[best]}
        if outcome.recovered_score is not None:
            metrics["prune_recovered_score"] = outcome.recovered_score
        reporter.log_metrics(metrics, step=r)
        reporter.progress(step=r, total=prune.rounds)
    return current


# --- scoring -----------------------------------------------------------------------------------------


def fixed_batches(
    images: torch.Tensor, *, t_range: tuple[int, int], num_batches: int, batch_size: int, seed: int,
    device: torch.device | str = "cpu",
) -> list[Batch]:
    """``num_batches`` fixed (x0, t, ε) batches: images taken in order (cycling), t uniform in
    ``[lo, hi)`` and ε drawn from a CPU generator seeded with ``seed`` (identical on every device).

    Args:
        images: uint8 ``[N x C x H x W]``.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    lo, hi = t_range
    n = images.shape[0]
    out = []
    for b in range(num_batches):
        idx = torch.arange(b * batch_size, (b + 1) * batch_size) % n
        x0 = to_model_range(images[idx])
        t = torch.randint(lo, hi, (len(idx),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        out.append((x0.to(device), t.to(device), noise.to(device)))
    return out


@torch.no_grad()
def eps_score(
    model: UNet, *, diffusion: Diffusion, batches: list[Batch], amp_dtype: torch.dtype | None = None,
) -> float:
    """Mean ε-MSE of ``model`` (eval mode) over ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device_type = batches[0][0].device.type
    try:
        for x0, t, noise in batches:
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = diffusion.eps_loss(model, x0, t, noise)
            total += float(loss.sum())
            count += len(t)
    finally:
        model.train(was_training)
    return total / count


# --- pruning one group --------------------------------------------------------------------------------


@dataclass
class PruneResult:
    """The pruned model and everything the search decided and cost."""

    model: UNet                    # pruned (and recovered) model, eval mode
    spec: UNetSpec                 # its spec (records the widths)
    memory: MemoryBank             # every candidate and decision
    flops: int                     # counted forward FLOPs per image of ``model``
    budget_flops: float
    dense_flops: float             # F
    met: bool                      # flops ≤ budget·(1 + tolerance)
    within_tolerance: bool         # |flops − budget| ≤ tolerance·budget
    round_flops: list[float]       # [R] counted FLOPs of the model accepted in each round
    score_before: float            # score of the model the search started from
    score_after: float             # score of the final model (same samples)
    search_flops: float            # total compute of the search, FLOPs
    search_flops_by_part: dict[str, float] = field(default_factory=dict)  # importance, scoring, recovery
    seconds: float = 0.0


def prune_to_budget(
    *, model: UNet, diffusion: Diffusion, train_images: torch.Tensor, heldout_images: torch.Tensor,
    t_range: tuple[int, int], budget_flops: float, config: PipelineConfig, seed: int | None = None,
    proxy: Proxy | None = None, device: torch.device | None = None, reporter: Reporter | None = None,
    work_dir: str | Path | None = None, candidate_recovery_steps: int = 0,
) -> PruneResult:
    """Prune ``model`` (dense or already pruned) to ``budget_flops`` in ``config.prune.rounds``
    progressive rounds (see the module docstring).

    Args:
        model: the starting model (e.g. the shared EMA model); it is not modified (moved, trained
            or pruned in place).
        diffusion: the training diffusion (ε-loss).
        train_images, heldout_images: uint8 ``[N x C x H x W]``; training images feed the Taylor
            importance and the recovery fine-tunes, held-out images the scores.
        t_range: the group's timesteps ``[lo, hi)``.
        budget_flops: the group's budget, FLOPs per image of one forward pass.
        config: the pipeline config (``prune``; the recovery fine-tunes' settings: ``train``,
            ``finetune.lr``/``batch_size``, ``data.random_flip``; stored in their checkpoints).
        seed: seed of the recovery fine-tunes (default ``train.seed``; a group's fine-tune passes
            its own): round r's recovery uses ``seed + 7919·r``.
        proxy: default :func:`tdc_core.method.pruning.proxies.factory.make_proxy` of ``config.prune``.
        device: default the model's device.
        work_dir: folder for the recovery trainers' scratch checkpoints (default the system temp
            folder); they are deleted when the search ends.
        candidate_recovery_steps: if > 0, every candidate is fine-tuned this many steps before it
            is scored (docs/METHOD.md's "score after a short recovery fine-tune"; all candidates of a
            round see the same batches); 0 scores candidates right after pruning.

    Raises:
        ConfigError: the budget lies below what ``prune.min_keep`` allows.
    """
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if next(model.parameters()).device != device:
        model = copy.deepcopy(model).to(device)  # the caller's model stays where it is
    plan = TrainPlan.finetune(config, t_range=t_range, seed=config.train.seed if seed is None else seed,
                              steps=max(config.prune.recovery_steps, candidate_recovery_steps))
    search = _GroupSearch(
        model=model, diffusion=diffusion, train_images=train_images, heldout_images=heldout_images,
        config=config, plan=plan, device=device, candidate_recovery_steps=candidate_recovery_steps,
    )
    prune = config.prune
    space = search.space
    dense = space.dense_flops
    current = _widths(model)
    lower = [int(x) for x in space.min_widths]
    if not prune.prune_attention:
        lower = [c if u.kind == "attn" else lo for u, lo, c in zip(space.units, lower, current)]
    floor = space.flops([min(lo, c) for lo, c in zip(lower, current)])
    if floor > budget_flops * (1 + prune.tolerance):
        raise ConfigError(
            f"FLOPs budget {budget_flops / dense:.3f} F cannot be reached: the narrowest model allowed by "
            f"prune.min_keep={prune.min_keep} (prune_attention={prune.prune_attention}) needs "
            f"{floor / dense:.3f} F; lower prune.min_keep or raise budget.k"
        )
    proxy = proxy or make_proxy(prune)
    memory = MemoryBank(units=space.units, dense_flops=dense, budget_flops=float(budget_flops),
                        tolerance=prune.tolerance, proxy=proxy.name, importance=prune.importance,
                        seed=prune.seed, t_range=(int(t_range[0]), int(t_range[1])))
    memory.score_before = search.score(model)
    # Recovery trainers must write checkpoints; they are scratch, removed when the search ends.
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tdc-prune-", dir=work_dir) as folder:
        search.folder = Path(folder)
        search_rounds(space=space, memory=memory, current_widths=current, lower_widths=lower,
                      budget_flops=budget_flops, prune=prune, proxy=proxy, evaluate=search.evaluate,
                      accept=search.accept, reporter=reporter)
    final = search.model.eval()
    flops = count_forward_flops(final, in_channels=model.spec.in_channels, image_size=model.spec.image_size)
    memory.flops = float(flops)
    memory.search_flops = math.fsum(search.cost.values())
    last = memory.rounds[-1]
    score_after = last.recovered_score if last.recovered_score is not None else last.score
    return PruneResult(
        model=final, spec=final.spec, memory=memory, flops=flops, budget_flops=float(budget_flops),
        dense_flops=dense, met=flops <= budget_flops * (1 + prune.tolerance) + 1e-6,
        within_tolerance=abs(flops - budget_flops) <= prune.tolerance * budget_flops + 1e-6,
        round_flops=[r.flops for r in memory.rounds], score_before=float(memory.score_before),
        score_after=float(score_after), search_flops=memory.search_flops, search_flops_by_part=dict(search.cost),
        seconds=time.perf_counter() - t0,
    )


def _widths(model: UNet) -> list[int]:
    res, attn = model.unit_widths()
    return res + attn


class _GroupSearch:
    """The model side of one group's search: importance, candidate surgery and scoring, recovery,
    and the compute they cost (FLOPs, by part)."""

    def __init__(
        self, *, model: UNet, diffusion: Diffusion, train_images: torch.Tensor, heldout_images: torch.Tensor,
        config: PipelineConfig, plan: TrainPlan, device: torch.device, candidate_recovery_steps: int,
    ) -> None:
        self.model = model  # the current model: the last accepted (and recovered) candidate
        self.diffusion, self.config, self.device = diffusion, config, device
        self.plan = plan  # the recovery fine-tunes' (seeded per round); its t_range is the group's
        self.train_images, self.heldout_images = train_images, heldout_images
        self.prune = config.prune
        self.candidate_recovery_steps = candidate_recovery_steps
        self.space = prune_space(model.spec, min_keep=self.prune.min_keep,
                                 width_multiple=self.prune.width_multiple)
        self.amp = autocast_dtype(config.train.precision, device)
        self.batch_size = plan.batch_size
        # Fixed batches: the same (image, t, ε) for every candidate and round.
        self.score_set = fixed_batches(heldout_images, t_range=plan.t_range, num_batches=self.prune.score_batches,
                                       batch_size=self.batch_size, seed=self.prune.seed, device=device)
        self.taylor_set = fixed_batches(train_images, t_range=plan.t_range, num_batches=self.prune.score_batches,
                                        batch_size=self.batch_size, seed=self.prune.seed + 1, device=device)
        self.cost = {"importance": 0.0, "scoring": 0.0, "recovery": 0.0}
        self.folder = Path(tempfile.gettempdir())
        self._scores: tuple[int, ChannelScores] | None = None
        self._best: tuple[float, list[int], UNet] | None = None  # only the best candidate stays in memory

    def score(self, model: UNet) -> float:
        self.cost["scoring"] += self.space.flops(_widths(model)) * sum(len(b[1]) for b in self.score_set)
        return eps_score(model, diffusion=self.diffusion, batches=self.score_set, amp_dtype=self.amp)

    def _taylor_losses(self, model: UNet) -> Iterator[torch.Tensor]:
        for x0, t, noise in self.taylor_set:
            yield self.diffusion.eps_loss(model, x0, t, noise).mean()

    def importance(self, round: int) -> ChannelScores:
        """Channel importance of the current model, computed once per round."""
        if self._scores is None or self._scores[0] != round:
            scores = channel_importance(self.model, importance=self.prune.importance, losses=self._taylor_losses)
            if self.prune.importance == "taylor":  # forward + backward ≈ 3 forwards
                self.cost["importance"] += (3.0 * self.space.flops(_widths(self.model))
                                            * sum(len(b[1]) for b in self.taylor_set))
            self._scores = (round, scores)
        return self._scores[1]

    def _cut(self, round: int, widths: list[int]) -> UNet:
        res_w, attn_w = self.space.split(widths)
        return prune_to_widths(self.model, res_widths=res_w, attn_widths=attn_w, scores=self.importance(round))

    def evaluate(self, round: int, proposals: list[Proposal]) -> list[float]:
        out: list[float] = []
        self._best = None
        for p in proposals:
            cand = self._cut(round, p.widths)
            if self.candidate_recovery_steps > 0:
                # seed offset 1: every candidate of the round trains on the same batches
                cand, s = self._recover(cand, round=round, steps=self.candidate_recovery_steps, seed_offset=1)
            else:
                s = self.score(cand)
            if math.isfinite(s) and (self._best is None or s < self._best[0]):
                self._best = (s, list(p.widths), cand)
            out.append(s)
        return out

    def accept(self, round: int, p: Proposal) -> RecoveryOutcome:
        if self._best is not None and self._best[1] == list(p.widths):
            chosen = self._best[2]
        else:  # not the one evaluate() kept (e.g. every score was NaN): cut it again
            chosen = self._cut(round, p.widths)
        self._best = None
        recovered = None
        if self.prune.recovery_steps > 0:
            chosen, recovered = self._recover(chosen, round=round, steps=self.prune.recovery_steps, seed_offset=0)
        self.model = chosen.eval()
        counted = count_forward_flops(chosen, in_channels=chosen.spec.in_channels, image_size=chosen.spec.image_size)
        return RecoveryOutcome(flops=float(counted), recovered_score=recovered,
                               recovery_steps=self.prune.recovery_steps)

    def _recover(self, model: UNet, *, round: int, steps: int, seed_offset: int) -> tuple[UNet, float]:
        """Fine-tune ``model`` for ``steps`` on the group's timesteps; returns the better of the
        trainer's raw and EMA weights by score (with few steps the EMA is mostly the model it
        started from), and that score."""
        trainer = Trainer(
            model=copy.deepcopy(model), diffusion=self.diffusion, config=self.config,
            # A cosine schedule spans this recovery's own steps.
            plan=self.plan.replace(seed=self.plan.seed + 7919 * round + seed_offset,
                                   cosine_steps=steps if self.plan.cosine_steps else None),
            train_images=self.train_images, heldout_images=self.heldout_images, device=self.device,
        )
        trainer.fit(until_step=steps, checkpoint_path=self.folder / "recovery.pt", reporter=NullReporter())
        # fit() measures the held-out loss at its start, its end and every heldout_every steps between.
        train = self.config.train
        evals = 2 + len([s for s in range(1, steps) if s % train.heldout_every == 0])
        flops = self.space.flops(_widths(model))
        self.cost["recovery"] += flops * self.batch_size * (3.0 * steps + evals * train.heldout_batches)
        raw, ema = copy.deepcopy(trainer.model).eval(), copy.deepcopy(trainer.ema).eval()
        raw_score, ema_score = self.score(raw), self.score(ema)
        return (ema, ema_score) if ema_score < raw_score else (raw, raw_score)


# --- the plot --------------------------------------------------------------------------------------


def plot_prune_rounds(memory: MemoryBank, path: str | Path) -> Path:
    """Write a PNG of the search: left, every candidate's score per round (accepted ones marked,
    the score after recovery joined by a line, the starting score dashed); right, FLOPs / F per
    round (candidates, accepted, the round targets and the budget). Returns ``path``."""
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    dense = memory.dense_flops
    rounds = [r.round for r in memory.rounds]
    cand = [e for e in memory.entries if e.score is not None]

    def x(e: MemoryEntry) -> float:  # candidates of a round side by side
        return e.round + (e.candidate % 7 - 3) * 0.03

    left.scatter([x(e) for e in cand], [e.score for e in cand], s=18, color="0.6",
                 label="candidates (before recovery)")
    acc = [e for e in cand if e.accepted]
    left.scatter([x(e) for e in acc], [e.score for e in acc], s=70, marker="*", color="tab:red", zorder=3,
                 label="accepted")
    rec = [(r.round, r.recovered_score) for r in memory.rounds if r.recovered_score is not None]
    if rec:
        left.plot(*zip(*rec), "o-", color="tab:blue", label="accepted, after recovery")
    if memory.score_before is not None:
        left.axhline(memory.score_before, color="black", linestyle="--", linewidth=1, label="start (unpruned)")
    left.set_xlabel("round")
    left.set_ylabel("held-out ε-MSE on the group's timesteps")
    left.set_title(f"Scores per round (proxy: {memory.proxy}, importance: {memory.importance})", fontsize=11)
    left.legend(fontsize=8)

    right.scatter([x(e) for e in memory.entries],
                  [e.flops / dense for e in memory.entries], s=18, color="0.6", label="candidates")
    right.plot(rounds, [r.flops / dense for r in memory.rounds], "*-", color="tab:red", markersize=10,
               label="accepted (counted)")
    right.plot(rounds, [r.target_flops / dense for r in memory.rounds], "_", color="black", markersize=20,
               markeredgewidth=2, label="round target")
    right.axhline(memory.budget_flops / dense, color="tab:green", linestyle="--", label="budget")
    right.axhspan(memory.budget_flops * (1 - memory.tolerance) / dense,
                  memory.budget_flops * (1 + memory.tolerance) / dense, color="tab:green", alpha=0.12,
                  label=f"± {memory.tolerance:.0%} tolerance")
    right.set_xlabel("round")
    right.set_ylabel("forward FLOPs / F (dense)")
    right.set_title("FLOPs per round", fontsize=11)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(rounds or [1])
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
