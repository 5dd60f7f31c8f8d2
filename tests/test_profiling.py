"""Difficulty profiling (docs/METHOD.md step 1): the record, its determinism, and the real signal.

A smoke-preset model trained for a few seconds on the digits is enough for the profile to show
the structure the method relies on: ε-loss highest at small t, and gradients of neighbouring
timesteps pointing the same way while distant ones do not.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import threading

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from tdc_core.config import DiffusionConfig, GroupingConfig, ProfileConfig, load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.errors import ConfigError, DataError
from tdc_core.evaluation.plots import plot_grouping, plot_profile
from tdc_core.method.budgets import assign_budgets
from tdc_core.method.grouping import group_timesteps
from tdc_core.method.profiling import (
    DEFAULT_MAX_GRADIENT_BYTES,
    DifficultyProfile,
    profile_difficulty,
    subset_parameters,
)
from tdc_core.model.unet import UNet
from tdc_core.reporter import RecordingReporter
from tdc_core.training.trainer import Trainer, init_model, prepare_data, spec_for

CPU = torch.device("cpu")
TRAIN_STEPS = 40  # ~2 s on one CPU core; the signals below hold with a wide margin (5 seeds)


class Probe:
    """A briefly trained smoke model and what profiling it needs."""

    def __init__(self, tmp_dir) -> None:
        self.cfg = load_config(preset="smoke", overrides=[
            f"train.steps={TRAIN_STEPS}", f"profile.profile_steps={TRAIN_STEPS}",
            "train.checkpoint_every=100000", "train.heldout_every=100000",
        ])
        train, self.heldout = prepare_data(self.cfg)
        self.diffusion = Diffusion.from_config(self.cfg.diffusion)
        trainer = Trainer(model=init_model(spec_for(self.cfg), seed=self.cfg.train.seed), diffusion=self.diffusion,
                          config=self.cfg, train_images=train, heldout_images=self.heldout, device=CPU)
        trainer.fit(until_step=TRAIN_STEPS, checkpoint_path=tmp_dir / "probe.pt")
        self.model = trainer.ema  # eval mode, requires_grad False, as the pipeline hands it over

    def profile(self, model=None, *, config: ProfileConfig | None = None, **kw) -> DifficultyProfile:
        return profile_difficulty(
            model=self.model if model is None else model, diffusion=self.diffusion,
            heldout_images=self.heldout, config=config or self.cfg.profile, device=CPU,
            model_step=TRAIN_STEPS, **kw,
        )


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Probe:
    return Probe(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def profile(probe) -> DifficultyProfile:
    return probe.profile()


def _without_time(p: DifficultyProfile) -> dict:
    return p.model_dump(exclude={"seconds"})


# --- the record ----------------------------------------------------------------------------


def test_profile_has_one_entry_per_bucket_and_valid_affinity(probe, profile):
    num_buckets, num_timesteps = probe.cfg.profile.num_buckets, probe.diffusion.num_steps
    a = profile.arrays()
    assert profile.num_buckets == num_buckets and profile.num_timesteps == num_timesteps
    assert a.bucket_edges.tolist() == np.round(np.linspace(0, num_timesteps, num_buckets + 1)).astype(int).tolist()
    # The buckets tile [0, T): every timestep lies in exactly one.
    covered = np.concatenate([np.arange(lo, hi) for lo, hi in zip(a.bucket_edges[:-1], a.bucket_edges[1:])])
    assert covered.tolist() == list(range(num_timesteps))
    for values in (a.snr_db, a.loss_mean, a.loss_std):
        assert values.shape == (num_buckets,) and np.isfinite(values).all()
    assert np.all(np.diff(a.snr_db) < 0), "SNR must fall strictly from bucket to bucket"
    assert np.all(a.loss_std >= 0)
    assert a.affinity.shape == (num_buckets, num_buckets)
    assert np.array_equal(a.affinity, a.affinity.T)
    assert np.allclose(np.diag(a.affinity), 1.0, atol=1e-5)
    assert a.affinity.min() >= -1.0 and a.affinity.max() <= 1.0
    assert profile.model_step == TRAIN_STEPS and profile.param_subset == "all"
    assert profile.num_params == sum(p.numel() for p in probe.model.parameters())
    assert profile.seconds > 0


def test_profiling_twice_gives_the_same_record_whatever_the_global_rng(probe, profile):
    torch.manual_seed(1234)  # the profile must draw only from its own seeded generators
    torch.rand(7)
    again = probe.profile()
    assert _without_time(again) == _without_time(profile)
    other_seed = probe.profile(config=probe.cfg.profile.model_copy(update={"seed": 1}))
    assert other_seed.loss_mean != profile.loss_mean


def test_profile_survives_a_json_round_trip(profile, tmp_path):
    path = profile.save(tmp_path / "profile.json")
    assert DifficultyProfile.load(path) == profile
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["truncate", "not_json", "bad_shape", "missing"])
def test_loading_a_broken_profile_is_a_data_error_naming_the_file(profile, tmp_path, damage):
    path = tmp_path / "profile.json"
    text = profile.model_dump_json()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "not_json":
        path.write_bytes(b"\x00\xffnot json at all")
    elif damage == "bad_shape":
        path.write_text(profile.model_copy(update={"affinity": profile.affinity[:-1]}).model_dump_json())
    with pytest.raises(DataError, match="profile.json"):
        DifficultyProfile.load(path)


# --- the numbers, by hand ---------------------------------------------------------------------


class TinyDenoiser(torch.nn.Module):
    """conv 1→4, + a learned per-timestep bias, tanh, conv 4→1; plus a parameter the loss never
    reaches (its gradient is zero)."""

    def __init__(self, num_timesteps: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.emb = torch.nn.Embedding(num_timesteps, 4)
        self.conv2 = torch.nn.Conv2d(4, 1, 3, padding=1)
        self.unused = torch.nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x) + self.emb(t)[:, :, None, None]))


def _tiny_setup():
    torch.manual_seed(0)
    model = TinyDenoiser(6).eval().requires_grad_(False)
    heldout = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    diffusion = Diffusion.from_config(DiffusionConfig(num_timesteps=6))
    config = ProfileConfig(num_buckets=3, loss_samples_per_bucket=4, affinity_batches=2, affinity_batch_size=3, seed=7)
    return model, heldout, diffusion, config


def _eps_mse(model, betas: np.ndarray, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean (ε − model(x_t, t))² with x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε, ᾱ from β."""
    ab = torch.from_numpy(np.cumprod(1.0 - betas)).to(x0.dtype)[t][:, None, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return (noise - model(x_t, t)).pow(2).mean(dim=(1, 2, 3))


def _affinity_by_hand(model, heldout, betas, config) -> np.ndarray:
    """The documented protocol with plain autograd, in float64: per batch k, images k·n, k·n+1,
    ... (cycling), one ε ~ Generator(seed + 1) for all buckets, then each bucket's t uniform in
    it; each bucket's gradient of its batch-mean ε-MSE over all parameters; cosines of every
    pair; the mean over batches."""
    model = copy.deepcopy(model).double().requires_grad_(True)
    params = list(model.parameters())
    edges = [0, 2, 4, 6]  # T = 6 in 3 equal buckets
    n, gen = config.affinity_batch_size, torch.Generator().manual_seed(config.seed + 1)
    total = np.zeros((3, 3))
    for k in range(config.affinity_batches):
        x0 = heldout[[(k * n + i) % len(heldout) for i in range(n)]].double() / 127.5 - 1
        noise = torch.randn(x0.shape, generator=gen).double()
        ts = [torch.randint(edges[b], edges[b + 1], (n,), generator=gen) for b in range(3)]
        grads = []
        for t in ts:
            g = torch.autograd.grad(_eps_mse(model, betas, x0, t, noise).mean(), params, allow_unused=True)
            grads.append(np.concatenate([
                (gi if gi is not None else torch.zeros_like(p)).reshape(-1).numpy() for gi, p in zip(g, params)
            ]))
        for i in range(3):
            for j in range(3):
                total[i, j] += grads[i] @ grads[j] / (np.linalg.norm(grads[i]) * np.linalg.norm(grads[j]))
    return total / config.affinity_batches


@pytest.mark.parametrize("max_gradient_bytes", [DEFAULT_MAX_GRADIENT_BYTES, 1], ids=["all-at-once", "blockwise"])
def test_affinity_is_the_mean_gradient_cosine_computed_by_hand(max_gradient_bytes):
    model, heldout, diffusion, config = _tiny_setup()
    profile = profile_difficulty(model=model, diffusion=diffusion, heldout_images=heldout, config=config,
                                 device=CPU, max_gradient_bytes=max_gradient_bytes)
    expected = _affinity_by_hand(model, heldout, diffusion.betas_np, config)
    assert not np.allclose(expected, 1.0, atol=0.05)  # the buckets' gradients do differ
    np.testing.assert_allclose(profile.arrays().affinity, expected, atol=1e-5)
    assert profile.num_params == 4 * 9 + 4 + 6 * 4 + 4 * 9 + 1 + 3


def test_bucket_losses_are_the_eps_mse_computed_by_hand():
    """Loss side, same protocol: Generator(seed) draws every bucket's t (bucket-major), then ε
    for sample i on held-out image i mod N; mean and spread over each bucket's samples."""
    model, heldout, diffusion, config = _tiny_setup()
    profile = profile_difficulty(model=model, diffusion=diffusion, heldout_images=heldout, config=config, device=CPU)
    n, gen = config.loss_samples_per_bucket, torch.Generator().manual_seed(config.seed)
    t = torch.cat([torch.randint(lo, lo + 2, (n,), generator=gen) for lo in (0, 2, 4)])
    x0 = heldout[[i % len(heldout) for i in range(3 * n)]].double() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=gen).double()
    with torch.no_grad():
        loss = _eps_mse(copy.deepcopy(model).double(), diffusion.betas_np, x0, t, noise).reshape(3, n).numpy()
    np.testing.assert_allclose(profile.loss_mean, loss.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(profile.loss_std, loss.std(axis=1), rtol=1e-4, atol=1e-7)


# --- the signal ----------------------------------------------------------------------------


def test_eps_loss_is_highest_at_small_t_and_falls_with_t(profile):
    loss = profile.arrays().loss_mean
    # Observed over 5 training seeds: ratio 4.7-6.5, Spearman -0.95 to -1.0, argmax always 0.
    assert int(np.argmax(loss)) == 0
    assert loss[0] > 3.0 * loss[-1]
    rank_corr = np.corrcoef(np.argsort(np.argsort(loss)), np.arange(loss.size))[0, 1]
    assert rank_corr < -0.8


def test_neighbouring_buckets_have_more_aligned_gradients_than_distant_ones(profile):
    aff = profile.arrays().affinity
    k = profile.num_buckets // 3
    next_door, two_apart = np.diag(aff, 1).mean(), np.diag(aff, 2).mean()
    far_corner = aff[:k, -k:].mean()  # first third of [0, T) against the last third
    # Observed over 5 seeds and all subsets: >= 0.91, >= 0.76, <= 0.22.
    assert next_door > two_apart > far_corner
    assert next_door - far_corner > 0.4


# --- parameters, model state ---------------------------------------------------------------


def test_parameter_subsets_count_fewer_parameters_and_leave_the_model_as_found(probe):
    model = copy.deepcopy(probe.model)
    model.train()
    model.middle_block.eval()                 # mixed modes must come back exactly
    model.requires_grad_(True)
    model.time_embed.requires_grad_(False)    # and so must mixed requires_grad flags
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}

    counts = {}
    for subset in ("all", "output", "middle"):
        cfg = probe.cfg.profile.model_copy(update={"param_subset": subset})
        counts[subset] = probe.profile(model, config=cfg).num_params
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())
    assert counts["output"] < counts["all"] and counts["middle"] < counts["all"]
    assert counts["all"] == sum(p.numel() for p in model.parameters())
    assert counts["middle"] == sum(p.numel() for p in model.middle_block.parameters())
    assert counts["output"] == sum(
        p.numel() for m in (model.out_norm, model.out_conv, model.output_blocks[-1]) for p in m.parameters()
    )


def test_profiling_runs_in_eval_mode_so_dropout_does_not_matter(probe, profile):
    spec = dataclasses.replace(probe.model.spec, model=probe.model.spec.model.model_copy(update={"dropout": 0.5}))
    noisy = UNet(spec)
    noisy.load_state_dict(probe.model.state_dict())
    noisy.train()
    assert _without_time(probe.profile(noisy)) == _without_time(profile)
    assert noisy.training


def test_blockwise_gram_gives_the_same_affinity_when_gradients_do_not_fit(probe):
    cfg = probe.cfg.profile.model_copy(update={"param_subset": "output"})
    whole = probe.profile(config=cfg)
    rec = RecordingReporter()
    # Room for 4 gradient vectors: blocks of 3 buckets plus one streamed vector.
    blocked = probe.profile(config=cfg, max_gradient_bytes=4 * 4 * whole.num_params, reporter=rec)
    assert np.allclose(blocked.arrays().affinity, whole.arrays().affinity, atol=1e-5)
    assert blocked.loss_mean == whole.loss_mean
    assert any("blocks of 3" in m for m in rec.messages)


def test_a_zero_gradient_has_cosine_zero_with_every_other_bucket(probe):
    # Untrained: the zero-initialised output convolution blocks every gradient to the middle.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = UNet(spec_for(probe.cfg))
    cfg = probe.cfg.profile.model_copy(update={"param_subset": "middle"})
    aff = probe.profile(untrained, config=cfg).arrays().affinity
    assert np.array_equal(aff, np.eye(aff.shape[0]))


def test_bad_inputs_are_clear_errors(probe):
    too_many = probe.cfg.profile.model_copy(update={"num_buckets": probe.diffusion.num_steps + 1})
    with pytest.raises(ConfigError, match="num_buckets"):
        probe.profile(config=too_many)
    with pytest.raises(DataError, match="uint8"):
        profile_difficulty(model=probe.model, diffusion=probe.diffusion, heldout_images=probe.heldout.float(),
                           config=probe.cfg.profile, device=CPU)
    with pytest.raises(ConfigError, match="param_subset"):
        subset_parameters(torch.nn.Linear(2, 2), "middle")


# --- figures -------------------------------------------------------------------------------


def test_figures_are_pngs_of_a_readable_size_drawn_without_pyplot(profile, tmp_path):
    # Read the raw rcParam: matplotlib.get_backend() may itself resolve a backend via pyplot.
    backend, had_pyplot = dict.__getitem__(matplotlib.rcParams, "backend"), "matplotlib.pyplot" in sys.modules
    a = profile.arrays()
    grouping = group_timesteps(bucket_edges=a.bucket_edges, snr_db=a.snr_db, loss_mean=a.loss_mean,
                               affinity=a.affinity, config=GroupingConfig(num_groups=3), difficulty="loss")
    budgets = assign_budgets(grouping=grouping, k=0.5, base_flops=1.0)
    # Two threads at once: the object API has no shared figure state.
    threads = [
        threading.Thread(target=plot_profile, args=(profile, tmp_path / "profile.png")),
        threading.Thread(target=plot_grouping, args=(profile, grouping, tmp_path / "grouping.png"),
                         kwargs={"budgets": budgets}),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in ("profile.png", "grouping.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG"
            width, height = img.size
        assert 800 <= width <= 3000 and 300 <= height <= 1500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grouping.png", "profile.png"]
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    with pytest.raises(ValueError, match="budgets"):
        plot_grouping(profile, grouping, tmp_path / "x.png", budgets=budgets[:-1])
