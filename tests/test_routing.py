"""The expert-routing denoiser: every sample is served by its group's model, nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tdc_core.config import DiffusionConfig, ModelConfig, load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import sample
from tdc_core.errors import CheckpointError
from tdc_core.method.routing import ExpertRouter, load_router
from tdc_core.model.unet import UNet, UNetSpec
from tdc_core.training.trainer import LoadedModel, Trainer, TrainPlan, init_model, load_model, spec_for

T = 100
BOUNDS = [0, 30, 55, 100]
TINY = UNetSpec(model=ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                                  norm_groups=4, num_heads=2), image_size=8, in_channels=1)


def tiny_unet(seed: int, spec: UNetSpec = TINY) -> UNet:
    """A tiny UNet whose zero-initialised layers are perturbed, so its output depends on x and t."""
    torch.manual_seed(seed)
    net = UNet(spec)
    for p in net.parameters():
        if not p.any():
            nn.init.normal_(p, std=0.1)
    return net.eval()


@pytest.fixture(scope="module")
def experts() -> list[UNet]:
    return [tiny_unet(seed) for seed in (1, 2, 3)]


def group_of(t: torch.Tensor) -> np.ndarray:
    return np.searchsorted(BOUNDS, t.numpy(), side="right") - 1


def mixed_batch(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Every group, each boundary and its neighbour, the ends, then shuffled.
    t = torch.tensor([0, 29, 30, 54, 55, 99] + torch.randint(0, T, (n - 6,), generator=g).tolist())
    t = t[torch.randperm(n, generator=g)]
    return torch.randn(n, 1, 8, 8, generator=g), t


@torch.no_grad()
def test_router_equals_each_group_model_on_its_own_samples(experts):
    x, t = mixed_batch()
    assert set(group_of(t)) == {0, 1, 2}
    expected = torch.empty(x.shape)
    for g, net in enumerate(experts):
        mask = torch.as_tensor(group_of(t) == g)
        expected[mask] = net(x[mask], t[mask])
    out = ExpertRouter(experts=experts, boundaries=BOUNDS)(x, t)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # ... and the experts really differ, so a wrong assignment would show.
    assert not torch.allclose(experts[0](x, t), experts[1](x, t), atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("g", [0, 1, 2])
def test_single_group_batch_is_the_expert_itself(experts, g):
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(g))
    t = torch.randint(BOUNDS[g], BOUNDS[g + 1], (6,), generator=torch.Generator().manual_seed(10 + g))
    out = ExpertRouter(experts=experts, boundaries=BOUNDS)(x, t)
    assert torch.equal(out, experts[g](x, t))


@torch.no_grad()
def test_router_of_one_model_everywhere_is_that_model(experts):
    x, t = mixed_batch(seed=5)
    net = experts[0]
    router = ExpertRouter(experts=[net, net, net], boundaries=BOUNDS)
    torch.testing.assert_close(router(x, t), net(x, t), rtol=1e-6, atol=1e-6)


class Constant(nn.Module):
    """An "expert" whose output is its own index everywhere."""

    def __init__(self, value: int) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, float(self.value))


def test_every_sample_is_served_by_the_expert_of_its_group():
    router = ExpertRouter(experts=[Constant(g) for g in range(3)], boundaries=BOUNDS)
    t = torch.arange(T)[torch.randperm(T, generator=torch.Generator().manual_seed(0))]
    out = router(torch.zeros(T, 1, 2, 2), t)
    served = out[:, 0, 0, 0].long().numpy()
    np.testing.assert_array_equal(served, group_of(t))
    assert (out == out[:, :1, :1, :1]).all()  # each sample's output is one expert's, whole
    assert [router.expert_index(int(s)) for s in t] == group_of(t).tolist()


def test_router_is_a_module_of_its_experts(experts):
    router = ExpertRouter(experts=experts, boundaries=BOUNDS)
    assert isinstance(router.experts, nn.ModuleList) and len(router.experts) == 3
    assert router.num_timesteps == T and router.num_groups == 3 and router.boundaries == BOUNDS
    assert sum(p.numel() for p in router.parameters()) == sum(p.numel() for e in experts for p in e.parameters())
    router.train()
    assert all(e.training for e in experts)
    router.eval()
    assert not any(e.training for e in experts)
    assert set(router.state_dict()) == {f"experts.{g}.{k}" for g, e in enumerate(experts) for k in e.state_dict()}


@pytest.mark.parametrize(
    ("boundaries", "n_experts", "match"),
    [
        ([0, 50, 50, 100], 3, "rise strictly"),
        ([0, 60, 40, 100], 3, "rise strictly"),
        ([10, 50, 80, 100], 3, "start at 0"),
        ([0, 50, 100], 3, "3 experts need 4 boundaries"),
        ([0, 20, 50, 80, 100], 3, "3 experts need 4 boundaries"),
        ([0], 1, "at least two"),
        ([0, 50.0, 100], 2, "integers"),
    ],
)
def test_bad_boundaries_are_refused(boundaries, n_experts, match):
    with pytest.raises(ValueError, match=match):
        ExpertRouter(experts=[Constant(g) for g in range(n_experts)], boundaries=boundaries)


@pytest.mark.parametrize("bad_t", [-1, T, T + 7])
def test_timesteps_outside_the_range_are_refused(bad_t):
    router = ExpertRouter(experts=[Constant(g) for g in range(3)], boundaries=BOUNDS)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        router(torch.zeros(3, 1, 2, 2), torch.tensor([5, bad_t, 60]))
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        router.expert_index(bad_t)


def test_malformed_t_is_refused():
    router = ExpertRouter(experts=[Constant(g) for g in range(3)], boundaries=BOUNDS)
    with pytest.raises(ValueError, match="shape"):
        router(torch.zeros(3, 1, 2, 2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        router(torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]))


# --- sampling ------------------------------------------------------------------------------


def _diffusion() -> Diffusion:
    return Diffusion.from_config(DiffusionConfig(num_timesteps=T))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_with_one_model_everywhere_equals_sampling_that_model(experts, sampler):
    d = _diffusion().respaced(12)
    net = experts[1]
    run = lambda m: sample(m, d, shape=(3, 1, 8, 8), generator=torch.Generator().manual_seed(7), sampler=sampler)  # noqa: E731
    assert torch.equal(run(ExpertRouter(experts=[net, net, net], boundaries=BOUNDS)), run(net))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_with_the_router_uses_each_steps_own_expert(experts, sampler):
    d = _diffusion().respaced(12)
    router = ExpertRouter(experts=experts, boundaries=BOUNDS)
    used = []

    def by_hand(x, t):  # the step's timestep picks the model, as the router should
        g = int(group_of(t[:1])[0])
        used.append(g)
        return experts[g](x, t)

    run = lambda m: sample(m, d, shape=(3, 1, 8, 8), generator=torch.Generator().manual_seed(7), sampler=sampler)  # noqa: E731
    routed = run(router)
    assert torch.equal(routed, run(by_hand))
    assert set(used) == {0, 1, 2}
    assert routed.shape == (3, 1, 8, 8) and torch.isfinite(routed).all()


# --- loading -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_checkpoints(tmp_path_factory):
    """Two tiny experts of the smoke config, trained 2 steps each on their own half of [0, T)."""
    cfg = load_config(preset="smoke", overrides=["train.steps=2", "profile.profile_steps=0"])
    # Random uint8 images stand in for the dataset: only the weights' round trip matters here.
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    train, heldout = images[:32], images[32:]
    diffusion = Diffusion.from_config(cfg.diffusion)
    folder = tmp_path_factory.mktemp("experts")
    paths = []
    for g, t_range in enumerate([(0, 40), (40, 100)]):
        trainer = Trainer(model=init_model(spec_for(cfg), seed=g), diffusion=diffusion, config=cfg,
                          plan=TrainPlan.dense(cfg).replace(seed=g, t_range=t_range),
                          train_images=train, heldout_images=heldout)
        trainer.fit(until_step=2, checkpoint_path=folder / f"group{g}.pt")
        paths.append(folder / f"group{g}.pt")
    return paths


@torch.no_grad()
def test_load_router_round_trip(group_checkpoints):
    router = load_router(checkpoints=group_checkpoints, boundaries=[0, 40, 100])
    direct = [load_model(p).model for p in group_checkpoints]
    assert not router.training and router.num_timesteps == 100
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([99, 0, 39, 40, 70, 5, 41, 12])
    expected = torch.empty(x.shape)
    for g, (lo, hi) in enumerate([(0, 40), (40, 100)]):
        mask = (t >= lo) & (t < hi)
        expected[mask] = direct[g](x[mask], t[mask])
    torch.testing.assert_close(router(x, t), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(direct[0](x, t), direct[1](x, t))


def test_load_router_refuses_boundaries_that_do_not_match_the_checkpoints(group_checkpoints):
    with pytest.raises(CheckpointError, match="T=100"):
        load_router(checkpoints=group_checkpoints, boundaries=[0, 40, 200])
    with pytest.raises(ValueError, match="2 checkpoints need 3 boundaries"):
        load_router(checkpoints=group_checkpoints, boundaries=[0, 30, 60, 100])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"image_size": 16}, "image size"),
        ({"learn_sigma": True}, "output channels"),
    ],
)
def test_load_router_refuses_experts_that_disagree_on_shapes(group_checkpoints, monkeypatch, change, match):
    first = load_model(group_checkpoints[0])
    odd_spec = UNetSpec(**{**vars(first.spec), **change})
    odd = LoadedModel(model=first.model, config=first.config, spec=odd_spec, step=2, t_range=(40, 100))
    monkeypatch.setattr("tdc_core.method.routing.load_model",
                        lambda p, **kw: first if p == group_checkpoints[0] else odd)
    with pytest.raises(CheckpointError, match=match):
        load_router(checkpoints=group_checkpoints, boundaries=[0, 40, 100])


def test_load_router_refuses_experts_of_different_diffusions(group_checkpoints, monkeypatch):
    first = load_model(group_checkpoints[0])
    linear = first.config.diffusion.model_copy(update={"schedule": "linear"})
    other_cfg = first.config.model_copy(update={"diffusion": linear})
    odd = LoadedModel(model=first.model, config=other_cfg, spec=first.spec, step=2, t_range=(40, 100))
    monkeypatch.setattr("tdc_core.method.routing.load_model",
                        lambda p, **kw: first if p == group_checkpoints[0] else odd)
    with pytest.raises(CheckpointError, match="diffusion"):
        load_router(checkpoints=group_checkpoints, boundaries=[0, 40, 100])
