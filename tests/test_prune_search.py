"""Progressive proxy-guided pruning of a group's model to its FLOPs budget (docs/METHOD.md step 5)."""

from __future__ import annotations

import copy

import pytest
import torch

from tdc_core.config import load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.errors import ConfigError
from tdc_core.method.pruning.proxies.records import MemoryBank
from tdc_core.method.pruning.search import plot_prune_rounds, prune_to_budget, round_targets
from tdc_core.method.pruning.space import prune_space
from tdc_core.model.flops import count_forward_flops
from tdc_core.model.unet import UNet
from tdc_core.reporter import RecordingReporter
from tdc_core.training.trainer import Trainer, TrainPlan, load_model, prepare_data, spec_for

T_RANGE = (60, 100)  # the group's timesteps (smoke preset: T = 100)


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Tiny CPU workloads: see ``one_thread`` in conftest."""


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(preset="smoke", overrides=["prune.rounds=2", "prune.candidates_per_round=3",
                                                 "prune.recovery_steps=2", "prune.score_batches=1",
                                                 "train.batch_size=8"])
    train, heldout = prepare_data(cfg)
    g = torch.Generator().manual_seed(0)
    model = UNet(spec_for(cfg)).eval()
    with torch.no_grad():  # a "trained-looking" model: no zero-initialised layers, every channel matters
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    dense = count_forward_flops(model, in_channels=1, image_size=8)
    return cfg, train, heldout, model, dense


def run(setup, *, fraction: float, reporter=None, **overrides):
    cfg, train, heldout, model, dense = setup
    if overrides:
        cfg = cfg.model_copy(update={"prune": cfg.prune.model_copy(update=overrides)})
    return prune_to_budget(model=model, diffusion=Diffusion.from_config(cfg.diffusion), train_images=train,
                           heldout_images=heldout, t_range=T_RANGE, budget_flops=fraction * dense, config=cfg,
                           reporter=reporter)


def test_round_targets_step_from_dense_to_the_budget():
    assert round_targets(dense_flops=100.0, budget_flops=60.0, rounds=4) == [90.0, 80.0, 70.0, 60.0]
    assert round_targets(dense_flops=100.0, budget_flops=61.3, rounds=1) == [61.3]


def test_pruning_meets_the_budget_deterministically_and_records_every_decision(setup, tmp_path):
    cfg, train, heldout, model, dense = setup
    reporter = RecordingReporter()
    result = run(setup, fraction=0.7, reporter=reporter)

    # the budget is met: FLOPs counted on the returned model, not estimated
    counted = count_forward_flops(result.model, in_channels=1, image_size=8)
    budget = 0.7 * dense
    assert counted == result.flops and result.met and result.within_tolerance
    assert abs(counted - budget) <= cfg.prune.tolerance * budget
    targets = round_targets(dense_flops=dense, budget_flops=budget, rounds=2)
    assert all(abs(f - t) <= cfg.prune.tolerance * t for f, t in zip(result.round_flops, targets))
    assert result.spec.res_inner == result.model.unit_widths()[0]
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([60, 99])
    assert result.model(x, t).shape == model(x, t).shape

    # every candidate and decision is recorded; one accepted per round; JSON round trip
    memory = result.memory
    assert [r.round for r in memory.rounds] == [1, 2]
    for r in (1, 2):
        entries = memory.round_entries(r)
        assert 1 <= len(entries) <= 3 and sum(e.accepted for e in entries) == 1
        accepted = next(e for e in entries if e.accepted)
        assert accepted.score == min(e.score for e in entries)
        assert memory.rounds[r - 1].recovered_score is not None
    assert MemoryBank.load(memory.save(tmp_path / "memory.json")) == memory
    assert memory.t_range == T_RANGE and memory.score_before == result.score_before
    assert result.search_flops > 0 and set(result.search_flops_by_part) == {"importance", "scoring", "recovery"}
    assert len([m for m in reporter.messages if m.startswith("prune round")]) == 2
    png = plot_prune_rounds(memory, tmp_path / "prune.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the pruned model saves and reloads alone (trainer checkpoint format)
    trainer = Trainer(model=copy.deepcopy(result.model), diffusion=Diffusion.from_config(cfg.diffusion), config=cfg,
                      plan=TrainPlan.dense(cfg).replace(t_range=T_RANGE), train_images=train, heldout_images=heldout)
    trainer.save(tmp_path / "group.pt")
    assert torch.equal(load_model(tmp_path / "group.pt").model(x, t), result.model(x, t))

    # same seed, same decisions, same weights
    again = run(setup, fraction=0.7)
    assert again.memory.model_dump_json() == memory.model_dump_json()
    for (k, a), (_, b) in zip(result.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_attention_can_be_left_whole_and_recovery_skipped(setup):
    cfg, _, _, model, dense = setup
    result = run(setup, fraction=0.75, prune_attention=False, recovery_steps=0, rounds=1, importance="magnitude")
    assert result.model.unit_widths()[1] == model.unit_widths()[1]
    assert result.model.unit_widths()[0] != model.unit_widths()[0]
    assert result.met and result.memory.rounds[0].recovered_score is None
    assert result.search_flops_by_part["recovery"] == 0 == result.search_flops_by_part["importance"]


def test_an_unreachable_budget_is_a_clear_error(setup):
    with pytest.raises(ConfigError, match="prune.min_keep"):
        run(setup, fraction=0.2)


def test_candidates_can_be_scored_after_a_short_recovery(setup):
    cfg, train, heldout, model, dense = setup
    cfg = cfg.model_copy(update={"prune": cfg.prune.model_copy(update={"rounds": 1, "recovery_steps": 0})})
    plain = prune_to_budget(model=model, diffusion=Diffusion.from_config(cfg.diffusion), train_images=train,
                            heldout_images=heldout, t_range=T_RANGE, budget_flops=0.8 * dense, config=cfg)
    tuned = prune_to_budget(model=model, diffusion=Diffusion.from_config(cfg.diffusion), train_images=train,
                            heldout_images=heldout, t_range=T_RANGE, budget_flops=0.8 * dense, config=cfg,
                            candidate_recovery_steps=2)
    assert [e.widths for e in tuned.memory.entries] == [e.widths for e in plain.memory.entries]
    assert [e.score for e in tuned.memory.entries] != [e.score for e in plain.memory.entries]
    assert tuned.met and tuned.search_flops_by_part["recovery"] > 0 == plain.search_flops_by_part["recovery"]


def test_widths_rounded_to_multiples_of_8_still_meet_the_budget(setup):
    """prune.width_multiple=8: every pruned width is a multiple of 8 (the smoke model's dense
    widths all are), and the FLOPs counted on the pruned model still meet the budget."""
    cfg, _, _, _, dense = setup
    fine = prune_space(spec_for(cfg), min_keep=0.1)
    assert (fine.quanta % 8).any()  # without rounding some unit moves in steps below 8
    result = run(setup, fraction=0.7, width_multiple=8)
    res, attn = result.model.unit_widths()
    assert all(w % 8 == 0 for w in [*res, *attn]), (res, attn)
    counted = count_forward_flops(result.model, in_channels=1, image_size=8)
    assert result.met and counted <= 0.7 * dense * (1 + cfg.prune.tolerance)


def test_width_multiple_applies_only_where_the_dense_width_allows():
    spec = spec_for(load_config(preset="digits"))
    space = prune_space(spec, min_keep=0.1, width_multiple=8)
    assert all(q % 8 == 0 for q in space.quanta)
    odd = prune_space(spec, min_keep=0.1, width_multiple=48)  # 32-wide units cannot be multiples of 48
    assert {u.dense_width: u.quantum for u in odd.units if u.kind == "res"}[32] == 8
    assert all(u.quantum % 48 == 0 for u in odd.units if u.dense_width % 48 == 0)
