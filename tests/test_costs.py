"""Reported costs: sampling FLOPs follow the routed experts, training FLOPs follow docs/METHOD.md's formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tdc_core.config import DiffusionConfig, ModelConfig
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import sample, sampling_timesteps
from tdc_core.method.budgets import budget_fractions
from tdc_core.method.costs import (
    SamplingCost,
    TrainingCost,
    measure_group_flops,
    sampling_cost,
    training_cost,
)
from tdc_core.method.routing import ExpertRouter
from tdc_core.model.flops import count_forward_flops
from tdc_core.model.unet import UNet, UNetSpec

TINY = UNetSpec(model=ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                                  norm_groups=4, num_heads=2), image_size=8, in_channels=1)


def tiny_unet(seed: int, spec: UNetSpec) -> UNet:
    torch.manual_seed(seed)
    net = UNet(spec)
    for p in net.parameters():
        if not p.any():
            nn.init.normal_(p, std=0.1)
    return net.eval()


def halved(spec: UNetSpec) -> UNetSpec:
    """The spec with every residual and attention block's inner width halved (physically pruned)."""
    res, att = UNet(spec).unit_widths()
    return dataclasses.replace(spec, res_inner=[w // 2 for w in res], attn_inner=[w // 2 for w in att])


# --- FLOPs by hand (one multiply-add = 2 FLOPs; biases, norms and activations not counted) ---


def conv_flops(cin: int, cout: int, out_px: int, k: int = 3, groups: int = 1) -> int:
    """A k x k convolution producing a cout x out_px x out_px map: one MAC per weight per output pixel."""
    return 2 * cout * (cin // groups) * k * k * out_px * out_px


class TinyConvNet(nn.Module):
    """conv 3→4 (3x3, 8x8) → grouped strided conv 4→8 (3x3, groups 2, 4x4) → linear 128→10;
    called as model(x, t) like a denoiser, t ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def test_flop_count_of_a_tiny_conv_net_is_its_macs_times_two():
    # conv1: 4 out ch x 64 px x (3 in ch x 9) MACs = 6912; conv2: 8 x 16 px x (2 x 9) = 2304;
    # fc: 128 x 10 = 1280 MACs. 2 x 10 496 = 20 992 FLOPs per image.
    by_hand = conv_flops(3, 4, 8) + conv_flops(4, 8, 4, groups=2) + 2 * 128 * 10
    assert by_hand == 2 * (6912 + 2304 + 1280) == 20_992
    net = TinyConvNet()
    assert measure_group_flops(models=[net, net], in_channels=3, image_size=8) == [20_992, 20_992]
    assert count_forward_flops(net, in_channels=3, image_size=8, batch_size=5) == 20_992  # per image


def res_flops(cin: int, inner: int, cout: int, px: int, emb: int) -> int:
    """An IDDPM residual block: conv cin→inner, the time projection emb→2·inner (scale and
    shift), conv inner→cout, and a 1x1 skip conv when cin ≠ cout."""
    skip = conv_flops(cin, cout, px, k=1) if cin != cout else 0
    return conv_flops(cin, inner, px) + 2 * emb * 2 * inner + conv_flops(inner, cout, px) + skip


def attn_flops(c: int, inner: int, px: int) -> int:
    """Self-attention over L = px² positions: 1x1 qkv c→3·inner, QKᵀ and AV (each L·L·inner
    MACs summed over heads), 1x1 projection inner→c."""
    length = px * px
    return 2 * length * c * 3 * inner + 2 * (2 * length * length * inner) + 2 * length * inner * c


def tiny_unet_flops(res: list[int], att: list[int]) -> int:
    """TINY (base 8, mult (1, 2), one residual block per level, attention at 4 px, 8x8x1 input,
    time embedding 8→32→32) layer by layer, given the inner widths in module order."""
    emb = 32
    return (2 * 8 * emb + 2 * emb * emb                                              # time embedding MLP
            + conv_flops(1, 8, 8)                                                    # stem
            + res_flops(8, res[0], 8, 8, emb)                                        # level 0 (8 px)
            + conv_flops(8, 8, 4)                                                    # stride-2 downsample
            + res_flops(8, res[1], 16, 4, emb) + attn_flops(16, att[0], 4)           # level 1 (4 px)
            + res_flops(16, res[2], 16, 4, emb) + attn_flops(16, att[1], 4)          # middle
            + res_flops(16, res[3], 16, 4, emb)
            + res_flops(16 + 16, res[4], 16, 4, emb) + attn_flops(16, att[2], 4)     # up, level 1: skips 16, 8
            + res_flops(16 + 8, res[5], 16, 4, emb) + attn_flops(16, att[3], 4)
            + conv_flops(16, 16, 8)                                                  # upsample conv at 8 px
            + res_flops(16 + 8, res[6], 8, 8, emb) + res_flops(8 + 8, res[7], 8, 8, emb)  # up, level 0
            + conv_flops(8, 1, 8))                                                   # output conv


@pytest.fixture(scope="module")
def experts_and_flops():
    specs = [halved(TINY), halved(TINY), TINY]  # the two easy groups pruned, the hard one dense
    experts = [tiny_unet(seed, spec) for seed, spec in enumerate(specs)]
    flops = measure_group_flops(models=experts, in_channels=1, image_size=8)
    return experts, flops


def test_measured_flops_of_dense_and_pruned_unets_are_their_layers_by_hand(experts_and_flops):
    experts, flops = experts_and_flops
    dense_res, dense_att = [8, 16, 16, 16, 16, 16, 8, 8], [16] * 4
    assert experts[2].unit_widths() == (dense_res, dense_att)
    assert experts[0].unit_widths() == ([w // 2 for w in dense_res], [w // 2 for w in dense_att])
    pruned, dense = tiny_unet_flops([w // 2 for w in dense_res], [8] * 4), tiny_unet_flops(dense_res, dense_att)
    assert (pruned, dense) == (1_250_304, 2_092_544)
    assert flops == [pruned, pruned, dense]
    assert all(isinstance(f, int) for f in flops)


@pytest.mark.parametrize("steps", [7, 100])
def test_sampling_cost_is_the_sum_of_each_visited_steps_serving_model(experts_and_flops, steps):
    experts, flops = experts_and_flops
    boundaries = [0, 30, 55, 100]
    d = Diffusion.from_config(DiffusionConfig(num_timesteps=100)).respaced(steps)
    visited = sampling_timesteps(d)
    cost = sampling_cost(visited_timesteps=visited, boundaries=boundaries, group_flops=flops, base_flops=flops[2])
    serving = [next(g for g in range(3) if boundaries[g] <= t < boundaries[g + 1]) for t in visited]
    assert cost.total_flops == sum(flops[g] for g in serving)
    assert cost.steps == steps == sum(cost.steps_per_group)
    assert cost.steps_per_group == [serving.count(g) for g in range(3)]
    assert cost.single_model_flops == steps * flops[2]
    assert cost.ratio == pytest.approx(cost.total_flops / cost.single_model_flops) and cost.ratio < 1


@torch.no_grad()
def test_sampling_cost_matches_the_flops_counted_while_sampling_with_the_router(experts_and_flops):
    experts, flops = experts_and_flops
    boundaries = [0, 30, 55, 100]
    router = ExpertRouter(experts=experts, boundaries=boundaries)
    d = Diffusion.from_config(DiffusionConfig(num_timesteps=100)).respaced(7)
    batch = 2
    with FlopCounterMode(display=False) as counter:
        sample(router, d, shape=(batch, 1, 8, 8), generator=torch.Generator().manual_seed(0), sampler="ddpm")
    cost = sampling_cost(visited_timesteps=sampling_timesteps(d), boundaries=boundaries, group_flops=flops,
                         base_flops=flops[2])
    assert counter.get_total_flops() == batch * cost.total_flops


@pytest.mark.parametrize("steps", [1000, 250, 100, 50])
def test_five_equal_groups_with_progressive_budgets_cost_80_percent(steps):
    # N = 5, k = 0.5: budgets 0.6 ... 1.0 F; the hardest group is the first (highest-SNR) one here,
    # which must not matter when every group gets the same number of steps.
    fractions = budget_fractions(num_groups=5, k=0.5)
    base = 3.0e9
    group_flops = [f * base for f in reversed(fractions)]
    d = Diffusion.from_config(DiffusionConfig(num_timesteps=1000)).respaced(steps)
    cost = sampling_cost(visited_timesteps=sampling_timesteps(d), boundaries=[0, 200, 400, 600, 800, 1000],
                         group_flops=group_flops, base_flops=base)
    assert cost.steps_per_group == [steps // 5] * 5
    assert cost.ratio == pytest.approx(0.8, abs=1e-12)


def test_sampling_cost_by_hand():
    cost = sampling_cost(visited_timesteps=[19, 15, 9, 0], boundaries=[0, 10, 20], group_flops=[1.0, 2.0],
                         base_flops=2.0)
    assert (cost.total_flops, cost.single_model_flops, cost.ratio, cost.steps_per_group) == (6.0, 8.0, 0.75, [2, 2])
    assert SamplingCost.model_validate_json(cost.model_dump_json()) == cost


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_flops": [1.0]}, "2 groups"),
        ({"visited_timesteps": []}, "empty"),
        ({"visited_timesteps": [5, 20]}, r"\[0, 20\)"),
        ({"visited_timesteps": [-1]}, r"\[0, 20\)"),
        ({"boundaries": [0, 20, 10]}, "rise strictly"),
        ({"base_flops": 0.0}, "base_flops"),
        ({"group_flops": [1.0, float("nan")]}, "group_flops"),
    ],
)
def test_sampling_cost_refuses_bad_input(kwargs, match):
    args = {"visited_timesteps": [1, 2], "boundaries": [0, 10, 20], "group_flops": [1.0, 2.0], "base_flops": 2.0}
    with pytest.raises(ValueError, match=match):
        sampling_cost(**{**args, **kwargs})


HAND = dict(shared_steps=10, base_flops=100.0, batch_size=4, finetune_steps=[5, 5], group_flops=[50.0, 100.0],
            finetune_batch_size=2, pruning_flops=500.0, baseline_steps=20, baseline_batch_size=4)


def test_training_cost_by_hand():
    cost = training_cost(**HAND)
    assert cost.backward_factor == 3.0
    assert cost.shared_flops == 10 * 100 * 4 * 3 == 12_000
    assert cost.finetune_flops_per_group == [5 * 50 * 2 * 3, 5 * 100 * 2 * 3] == [1500, 3000]
    assert cost.finetune_flops == 4500 and cost.pruning_flops == 500
    assert cost.tdc_flops == 12_000 + 4500 + 500 == 17_000
    assert cost.baseline_flops == 20 * 100 * 4 * 3 == 24_000
    assert cost.ratio == pytest.approx(17_000 / 24_000) and cost.ratio < 1
    assert TrainingCost.model_validate_json(cost.model_dump_json()) == cost


def test_training_cost_ratio_exceeds_one_when_tdc_costs_more():
    cost = training_cost(**{**HAND, "baseline_steps": 10})  # baseline 12 000 < TDC 17 000
    assert cost.ratio == pytest.approx(17_000 / 12_000) and cost.ratio > 1


def test_backward_factor_scales_the_training_terms_but_not_pruning():
    one, three = training_cost(**HAND, backward_factor=1.0), training_cost(**HAND)
    assert three.shared_flops == 3 * one.shared_flops and three.finetune_flops == 3 * one.finetune_flops
    assert three.baseline_flops == 3 * one.baseline_flops and three.pruning_flops == one.pruning_flops == 500
    no_pruning = {**HAND, "pruning_flops": 0.0}
    assert training_cost(**no_pruning, backward_factor=1.0).ratio == pytest.approx(training_cost(**no_pruning).ratio)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"finetune_steps": [5]}, "finetune_steps has 1"),
        ({"baseline_steps": 0}, "baseline"),
        ({"shared_steps": -1}, "shared_steps"),
        ({"pruning_flops": -1.0}, "pruning_flops"),
        ({"backward_factor": 0.0}, "backward_factor"),
        ({"group_flops": [50.0, 0.0]}, "group_flops"),
    ],
)
def test_training_cost_refuses_bad_input(change, match):
    with pytest.raises(ValueError, match=match):
        training_cost(**{**HAND, **change})
