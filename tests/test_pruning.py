"""Structural pruning of the UNet: channels really go, FLOPs are exact, nothing else changes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tdc_core.config import ModelConfig, load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.method.pruning.importance import channel_importance
from tdc_core.method.pruning.proxies.projection import project_to_budget
from tdc_core.method.pruning.proxies.records import ProxyState
from tdc_core.method.pruning.space import PruneSpace, count_spec_flops, prune_space, unit_blocks, widths_for
from tdc_core.method.pruning.surgery import prune_to_widths, prune_unet
from tdc_core.model.flops import count_forward_flops
from tdc_core.model.unet import UNet, UNetSpec
from tdc_core.training.trainer import Trainer, load_model, prepare_data, spec_for

MODELS = {
    # smoke-like: scale-shift, 8 GroupNorm groups, 2 heads
    "scale_shift": UNetSpec(model=ModelConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                              attention_resolutions=(4,), num_heads=2, norm_groups=8),
                            image_size=8, in_channels=1),
    # additive time embedding, learned Σ (2C outputs), heads from num_head_channels, 3 levels
    "additive": UNetSpec(model=ModelConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                                           attention_resolutions=(8, 4), num_head_channels=8, norm_groups=4,
                                           use_scale_shift_norm=False),
                         image_size=16, in_channels=3, learn_sigma=True),
    # resampling inside residual blocks, no attention
    "updown": UNetSpec(model=ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=2,
                                         attention_resolutions=(), norm_groups=4, resblock_updown=True),
                       image_size=8, in_channels=1),
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Tiny CPU workloads: see ``one_thread`` in conftest."""


_SPACES: dict[str, PruneSpace] = {}


def space_of(name: str) -> PruneSpace:
    """The unit table of MODELS[name] (three FLOPs counts: computed once per session)."""
    if name not in _SPACES:
        _SPACES[name] = prune_space(MODELS[name], min_keep=0.1)
    return _SPACES[name]


def random_model(spec: UNetSpec, seed: int = 0) -> UNet:
    """A UNet whose zero-initialised layers are randomised too, so every channel matters."""
    g = torch.Generator().manual_seed(seed)
    model = UNet(spec).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(spec: UNetSpec, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, spec.in_channels, spec.image_size, spec.image_size, generator=g)
    return x, torch.tensor([0, 400, 999][:n])


def all_ones(model: UNet) -> dict[str, list[float]]:
    res, attn = model.unit_widths()
    return {"res_keep": [1.0] * len(res), "attn_keep": [1.0] * len(attn)}


@pytest.mark.parametrize("name", MODELS)
def test_keep_ratio_one_returns_an_identical_model(name):
    model = random_model(MODELS[name])
    x, t = inputs(model.spec)
    same = prune_unet(model, **all_ones(model))
    assert same is not model
    assert torch.equal(same(x, t), model(x, t))
    assert same.unit_widths() == model.unit_widths()
    # also for an already pruned model: keep 1 means "keep what is left"
    res, attn = model.unit_widths()
    smaller = prune_unet(model, res_keep=[0.5] * len(res), attn_keep=[0.5] * len(attn))
    again = prune_unet(smaller, **all_ones(smaller))
    assert torch.equal(again(x, t), smaller(x, t))


@pytest.mark.parametrize("name", MODELS)
def test_pruned_model_is_smaller_runs_and_keeps_its_output_shape(name):
    model = random_model(MODELS[name])
    x, t = inputs(model.spec)
    res, attn = model.unit_widths()
    pruned = prune_unet(model, res_keep=[0.5] * len(res), attn_keep=[0.5] * len(attn), importance="magnitude")
    y = pruned(x, t)
    assert y.shape == model(x, t).shape and torch.isfinite(y).all()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert pruned.spec.res_inner == pruned.unit_widths()[0] and pruned.spec.attn_inner == pruned.unit_widths()[1]
    assert all(w < d for w, d in zip(pruned.unit_widths()[0], res))
    # the original is untouched and shares no storage with the pruned copy
    assert model.unit_widths() == (res, attn)
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not ptrs & {p.data_ptr() for p in pruned.parameters()}


def test_widths_are_whole_groups_and_heads_and_respect_min_keep():
    widths = widths_for(keep=[0.5, 0.49, 0.0, 1.7], dense=[64, 64, 64, 32], quanta=[8, 8, 8, 4], min_keep=0.1)
    assert widths == [32, 32, 8, 32]
    # halves round up; min_keep rounds up to a whole quantum
    assert widths_for(keep=[0.5625, 0.0], dense=[64, 64], quanta=[8, 8], min_keep=0.3) == [40, 24]
    # a quantum as large as the width keeps it whole
    assert widths_for(keep=[0.2], dense=[8], quanta=[8], min_keep=0.1) == [8]
    with pytest.raises(ValueError, match="multiple of its quantum"):
        widths_for(keep=[0.5], dense=[10], quanta=[4], min_keep=0.1)


def test_groupnorm_keeps_the_dense_group_count_and_heads_stay_intact():
    spec = MODELS["scale_shift"]
    model = random_model(spec)
    space = space_of("scale_shift")
    rng = np.random.default_rng(0)
    for _ in range(3):
        widths = space.widths(rng.uniform(0.0, 1.0, len(space.units)))
        res_w, attn_w = space.split(widths)
        pruned = prune_to_widths(model, res_widths=res_w, attn_widths=attn_w,
                                 scores=channel_importance(model, importance="magnitude"))
        for (_, a), (_, b) in zip(unit_blocks(model)[0], unit_blocks(pruned)[0]):
            assert b.out_norm.num_groups == a.out_norm.num_groups
            assert b.emb_proj.out_features == 2 * b.in_conv.out_channels == 2 * b.out_conv.in_channels
        for (_, a), (_, b) in zip(unit_blocks(model)[1], unit_blocks(pruned)[1]):
            assert b.num_heads == a.num_heads
            assert b.qkv.out_channels == 3 * b.proj.in_channels and b.proj.in_channels % b.num_heads == 0


def test_residual_channels_are_removed_evenly_from_every_group():
    spec = MODELS["scale_shift"]
    model = random_model(spec)
    scores = channel_importance(model, importance="magnitude")
    # Make the first half of the channels of residual unit 1 (32 wide, 8 groups of 4) the most
    # important: a global top-16 would take exactly them, a group-balanced one 2 from each group.
    scores.res[1][:] = torch.arange(32, 0, -1, dtype=torch.float32)
    res, attn = model.unit_widths()
    res_w = list(res)
    res_w[1] = 16
    pruned = prune_to_widths(model, res_widths=res_w, attn_widths=attn, scores=scores)
    block_old = unit_blocks(model)[0][1][1]
    block_new = unit_blocks(pruned)[0][1][1]
    kept = [int(torch.nonzero((block_old.in_conv.weight == w).flatten(1).all(1))[0]) for w in block_new.in_conv.weight]
    assert kept == [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29]


def test_attention_pruning_is_exact_when_the_removed_channels_are_silent():
    """Remove q/k pairs whose q rows are zero and v channels whose proj columns are zero: the
    attention output must not change (checks the (3, heads, d) layout, per-head selection and
    the sqrt(d'/d) temperature correction)."""
    spec = MODELS["scale_shift"]
    model = random_model(spec)
    heads = unit_blocks(model)[1][0][1].num_heads
    with torch.no_grad():
        for _, b in unit_blocks(model)[1]:
            d = b.proj.in_channels // heads
            q = b.qkv.weight.view(3, heads, d, -1)
            qb = b.qkv.bias.view(3, heads, d)
            proj = b.proj.weight.view(b.proj.out_channels, heads, d)
            for h in range(heads):
                silent = torch.arange(h % 2, d, 2)  # different channels in different heads
                q[0, h, silent] = 0
                qb[0, h, silent] = 0
                proj[:, h, silent] = 0
    x, t = inputs(spec)
    res, attn = model.unit_widths()
    pruned = prune_to_widths(model, res_widths=res, attn_widths=[w // 2 for w in attn],
                             scores=channel_importance(model, importance="magnitude"))
    assert pruned.unit_widths()[1] == [w // 2 for w in attn]
    torch.testing.assert_close(pruned(x, t), model(x, t), rtol=1e-5, atol=1e-5)


def test_residual_coupling_matches_torch_pruning_depgraph():
    """Our slicing of a residual block touches exactly the layers and indices DepGraph couples
    to its in_conv's output channels (incl. emb_proj's scale and shift halves)."""
    tp = pytest.importorskip("torch_pruning")
    spec = MODELS["scale_shift"]
    model = random_model(spec)
    x, t = inputs(spec, n=1)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=(x, t))
    for name, block in unit_blocks(model)[0][:3]:
        w = block.in_conv.out_channels
        group = graph.get_pruning_group(block.in_conv, tp.prune_conv_out_channels, idxs=[0, 3])
        touched = {}
        for dep, idxs in group:
            layer = dep.target.module
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)):
                touched[(_name_in(model, layer), dep.handler.__name__)] = sorted(idxs)
        assert touched == {
            (f"{name}.in_conv", "prune_out_channels"): [0, 3],
            (f"{name}.out_norm", "prune_out_channels"): [0, 3],
            (f"{name}.emb_proj", "prune_out_channels"): [0, 3, w, w + 3],
            (f"{name}.out_conv", "prune_in_channels"): [0, 3],
        }


def _name_in(model: torch.nn.Module, layer: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is layer)


def test_flops_model_is_exact_and_meta_counting_matches_real_weights():
    for name, spec in MODELS.items():
        space = space_of(name)
        assert space.dense_flops == count_forward_flops(UNet(spec), in_channels=spec.in_channels,
                                                        image_size=spec.image_size)
        rng = np.random.default_rng(0)
        widths = space.widths(rng.uniform(0, 1, len(space.units)))
        res_w, attn_w = space.split(widths)
        pruned = replace(spec, res_inner=res_w, attn_inner=attn_w)
        assert count_spec_flops(pruned) == space.flops(widths)


@pytest.mark.parametrize("name", ["scale_shift", "additive"])
@pytest.mark.parametrize("prune_attention", [True, False])
def test_pruned_flops_counted_meet_the_target(name, prune_attention):
    spec = MODELS[name]
    model = random_model(spec)
    scores = channel_importance(model, importance="magnitude")
    space = space_of(name)
    current = [int(w) for w in space.dense_widths]
    lower = [int(w) if (u.kind == "attn" and not prune_attention) else int(m)
             for u, w, m in zip(space.units, current, space.min_widths)]
    rng = np.random.default_rng(0)
    for fraction in (0.9, 0.75, 0.6):
        target = fraction * space.dense_flops
        state = ProxyState(round=1, rounds=1, space=space, current_widths=current, lower_widths=lower,
                           target_flops=target, budget_flops=target, tolerance=0.02, num_candidates=1, seed=0)
        for _ in range(2):
            proposal = project_to_budget(rng.uniform(0, 1, len(space.units)), state=state, proxy="test")
            res_w, attn_w = space.split(proposal.widths)
            pruned = prune_to_widths(model, res_widths=res_w, attn_widths=attn_w, scores=scores)
            counted = count_forward_flops(pruned, in_channels=spec.in_channels, image_size=spec.image_size)
            assert counted == proposal.flops
            assert abs(counted - target) <= 0.02 * target, (counted / space.dense_flops, fraction)
            if not prune_attention:
                assert pruned.unit_widths()[1] == model.unit_widths()[1]


def test_taylor_importance_uses_the_loss_and_leaves_the_model_as_it_was():
    spec = MODELS["scale_shift"]
    model = random_model(spec).requires_grad_(False).train()
    diffusion = Diffusion.from_config(load_config(preset="smoke").diffusion)
    x, _ = inputs(spec, n=4)
    g = torch.Generator().manual_seed(3)
    batches = [(x.clamp(-1, 1), torch.randint(0, 100, (4,), generator=g), torch.randn(x.shape, generator=g))]

    def losses(m):
        for x0, t, noise in batches:
            yield diffusion.eps_loss(m, x0, t, noise).mean()

    # A channel whose outgoing weights are zero cannot change the loss: Taylor scores it 0.
    block = unit_blocks(model)[0][0][1]
    with torch.no_grad():
        block.out_conv.weight[:, 5] = 0
    scores = channel_importance(model, importance="taylor", losses=losses)
    assert scores.res[0].shape == (block.in_conv.out_channels,)
    assert int(torch.argmin(scores.res[0])) == 5
    assert all(s.shape == (2, 16) for s in scores.attn_qk + scores.attn_v)
    assert model.training and not any(p.requires_grad or p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="losses"):
        channel_importance(model, importance="taylor")


def test_invalid_widths_are_refused():
    model = random_model(MODELS["scale_shift"])
    res, attn = model.unit_widths()
    scores = channel_importance(model, importance="magnitude")
    with pytest.raises(ValueError, match="must be in"):
        prune_to_widths(model, res_widths=[res[0] + 8, *res[1:]], attn_widths=attn, scores=scores)
    with pytest.raises(ValueError, match="multiple of 2 heads"):
        prune_to_widths(model, res_widths=res, attn_widths=[attn[0] - 1, *attn[1:]], scores=scores)
    with pytest.raises(ValueError, match="units"):
        prune_to_widths(model, res_widths=res[:-1], attn_widths=attn, scores=scores)


def test_pruned_checkpoint_reloads_alone_with_identical_outputs(tmp_path):
    cfg = load_config(preset="smoke")
    model = random_model(spec_for(cfg))
    res, attn = model.unit_widths()
    pruned = prune_unet(model, res_keep=[0.6] * len(res), attn_keep=[0.4] * len(attn))
    train, heldout = prepare_data(cfg)
    trainer = Trainer(model=pruned, diffusion=Diffusion.from_config(cfg.diffusion), config=cfg,
                      train_images=train, heldout_images=heldout)
    trainer.save(tmp_path / "pruned.pt")
    loaded = load_model(tmp_path / "pruned.pt")
    assert loaded.spec.res_inner == pruned.unit_widths()[0] and loaded.spec.attn_inner == pruned.unit_widths()[1]
    x, t = inputs(pruned.spec)
    assert torch.equal(loaded.model(x, t), pruned.eval()(x, t))
