"""Sample generation, per-seed FID/KID evaluation, and the TDC-vs-baseline comparison."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tdc_core.config import load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import generate
from tdc_core.errors import CheckpointError, ConfigError
from tdc_core.evaluation.compare import compare, score_heldout_models
from tdc_core.evaluation.features import DIGITS_LABEL, build_extractor
from tdc_core.evaluation.fid import score_features
from tdc_core.evaluation.results import Comparison, Contender, ContenderCost, EvalResult, EvalSetup
from tdc_core.evaluation.scoring import evaluate_model, score_real
from tdc_core.method.routing import ExpertRouter
from tdc_core.model.unet import UNet
from tdc_core.run import stages
from tdc_core.run.evaluation import compare_run, reference_for_config
from tdc_core.run.layout import RunLayout
from tdc_core.run.study import replicate_metrics
from tdc_core.training.trainer import load_model, run_training, spec_for

# 80 steps at batch 32 (~6 s on one core) already draw digit-like samples: held-out FID with the
# digits CNN ≈ 2.4 vs ≈ 6.6 untrained and ≈ 10 for uniform noise (64 samples, 10 DDIM steps).
TRAIN_OVERRIDES = ["train.steps=80", "train.batch_size=32", "train.ema_decay=0.95", "data.max_images=null",
                   "train.checkpoint_every=1000", "train.heldout_every=1000", "train.log_every=1000"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Tiny CPU workloads: see ``one_thread`` in conftest."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A briefly trained smoke model, an untrained one, the digits extractor and the reference."""
    cache = tmp_path_factory.getbasetemp() / "tdc-cache"  # shared with test_fid: one CNN training
    # eval.reference=auto picks the held-out split here (it holds more images than a seed's samples).
    cfg = load_config(preset="smoke", overrides=[*TRAIN_OVERRIDES, f"eval.cache_dir={cache}"])
    result = run_training(cfg, run_dir=tmp_path_factory.mktemp("trained"))
    trained = load_model(result.checkpoint).model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        untrained = UNet(spec_for(cfg)).eval()
    extractor = build_extractor(cfg.eval, cfg.data)
    reference, heldout, train_images = reference_for_config(cfg, extractor)
    assert reference.info.split == "heldout"
    return {"train_images": train_images,
            "cfg": cfg, "trained": trained, "untrained": untrained, "extractor": extractor, "reference": reference,
            "heldout": heldout, "diffusion": Diffusion.from_config(cfg.diffusion), "setup": EvalSetup.from_config(cfg)}


@pytest.fixture(scope="module")
def trained_eval(env, tmp_path_factory) -> EvalResult:
    return evaluate_model(env["trained"], env["diffusion"], name="trained", setup=env["setup"], image_shape=(1, 8, 8),
                          extractor=env["extractor"], reference=env["reference"],
                          out_dir=tmp_path_factory.mktemp("eval"))


# --- generation --------------------------------------------------------------------------------


def test_generate_is_seeded_batched_and_deterministic(env):
    model, diffusion = env["untrained"], env["diffusion"].respaced(4)
    model.train()  # generate must sample in eval mode and give the mode back
    kwargs = dict(batch_size=4, image_shape=(1, 8, 8), sampler="ddim")
    a = generate(model, diffusion, num=10, seed=0, **kwargs)
    assert a.shape == (10, 1, 8, 8) and a.dtype == torch.uint8 and a.device.type == "cpu"
    assert torch.equal(a, generate(model, diffusion, num=10, seed=0, **kwargs))
    assert not torch.equal(a, generate(model, diffusion, num=10, seed=1, **kwargs))
    # Later batches draw after earlier ones: the first images do not depend on how many follow.
    assert torch.equal(a[:4], generate(model, diffusion, num=4, seed=0, **kwargs))
    ddpm = dict(kwargs, sampler="ddpm")
    once, twice = (generate(model, diffusion, num=6, seed=3, **ddpm) for _ in range(2))
    assert torch.equal(once, twice)
    assert model.training
    model.eval()


# --- scores ------------------------------------------------------------------------------------


def test_a_trained_model_scores_far_better_than_an_untrained_one_and_than_noise(env, trained_eval):
    untrained = evaluate_model(env["untrained"], env["diffusion"], name="untrained", setup=env["setup"],
                               image_shape=(1, 8, 8), extractor=env["extractor"], reference=env["reference"])
    n = env["setup"].num_samples
    noise = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noise_fid, noise_kid = score_features(env["extractor"].features(noise), env["reference"])
    assert trained_eval.fid_mean < 0.5 * untrained.fid_mean, (trained_eval.fid_mean, untrained.fid_mean)
    assert trained_eval.fid_mean < 0.5 * noise_fid, (trained_eval.fid_mean, noise_fid)
    assert max(s.fid for s in trained_eval.per_seed) < min(s.fid for s in untrained.per_seed)  # on every seed
    # KID is not reported below 2,000 images per seed (it flips rankings there): no number to misread.
    assert trained_eval.kid_mean is None and untrained.kid_mean is None and noise_kid > 0
    assert all(s.kid is None for s in trained_eval.per_seed)
    real = score_real(env["train_images"], extractor=env["extractor"], reference=env["reference"])
    assert real.fid < trained_eval.fid_mean  # real digits outside the reference are the floor


def test_an_eval_result_lists_every_seed_and_its_provenance(env, trained_eval):
    r, setup = trained_eval, env["setup"]
    assert [s.seed for s in r.per_seed] == list(setup.seeds)
    fids = [s.fid for s in r.per_seed]
    assert r.fid_mean == pytest.approx(np.mean(fids)) and r.fid_std == pytest.approx(np.std(fids, ddof=1))
    assert r.num_samples == setup.num_samples and r.sampler == setup.sampler and r.sampling_steps == setup.steps
    assert r.seconds_per_image > 0 and all(s.sampling_seconds > 0 for s in r.per_seed)
    assert r.feature_extractor == env["extractor"].identity and r.fid_mode == "digits-native"
    assert r.comparability == DIGITS_LABEL and r.reference == env["reference"].info
    grid = Path(r.grid_png)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = EvalResult.model_validate_json((grid.parent / "trained-eval.json").read_text())
    assert saved == r


def test_evaluation_refuses_a_reference_from_another_extractor(env):
    other = env["reference"].info.model_copy(update={"feature_extractor": "inception-v3/x"})
    reference = type(env["reference"])(info=other, stats=env["reference"].stats, features=env["reference"].features,
                                       reused=True)
    with pytest.raises(ValueError, match="reference statistics were computed with inception-v3/x"):
        evaluate_model(env["trained"], env["diffusion"], name="x", setup=env["setup"], image_shape=(1, 8, 8),
                       extractor=env["extractor"], reference=reference)


def test_eval_setup_comes_from_the_config_and_rejects_bad_steps(env):
    cfg = env["cfg"]
    setup = EvalSetup.from_config(cfg, seeds=[5, 6, 7], steps=20)
    assert setup.num_samples == cfg.eval.num_samples and setup.seeds == (5, 6, 7) and setup.steps == 20
    assert setup.sampler == cfg.sample.sampler and setup.eta == cfg.sample.eta
    with pytest.raises(ConfigError, match="exceed diffusion.num_timesteps"):
        EvalSetup.from_config(cfg, steps=cfg.diffusion.num_timesteps + 1)
    with pytest.raises(ConfigError, match="seeds"):
        EvalSetup.from_config(cfg, seeds=[])


# --- the comparison ----------------------------------------------------------------------------


def test_compare_evaluates_both_identically_and_writes_table_json_and_plot(env, trained_eval, tmp_path):
    cfg = env["cfg"]
    T = cfg.diffusion.num_timesteps
    # A "TDC" whose two experts are both the trained model: with the same seeds (hence the same
    # noise) it must reproduce the trained model's scores exactly.
    router = ExpertRouter(experts=[env["trained"], env["trained"]], boundaries=[0, T // 2, T]).eval()
    tdc = Contender(name="tdc", model=router, cost=ContenderCost(
        forward_flops=[1e6, 1e6], sampling_flops_per_image=8e6, training_flops=3e12, training_detail="test"))
    base = Contender(name="baseline", model=env["untrained"], cost=ContenderCost(
        forward_flops=[1e6], sampling_flops_per_image=1e7, training_flops=4e12, training_detail="test"))
    c = compare(tdc=tdc, baseline=base, diffusion=env["diffusion"], setup=env["setup"], image_shape=(1, 8, 8),
                extractor=env["extractor"], reference=env["reference"], out_dir=tmp_path,
                heldout_images=env["heldout"])
    assert [s.fid for s in c.tdc.eval.per_seed] == pytest.approx([s.fid for s in trained_eval.per_seed])
    for row in (c.tdc, c.baseline):
        e = row.eval
        assert [s.seed for s in e.per_seed] == list(env["setup"].seeds)
        assert (e.num_samples, e.sampler, e.sampling_steps, e.eta) == (
            c.setup.num_samples, c.setup.sampler, c.setup.steps, c.setup.eta)
        assert e.comparability == DIGITS_LABEL and Path(e.grid_png).is_file()
    assert c.fid_difference == pytest.approx(c.tdc.eval.fid_mean - c.baseline.eval.fid_mean) and c.fid_difference < 0
    assert c.sampling_flops_ratio == pytest.approx(0.8) and c.training_flops_ratio == pytest.approx(0.75)
    assert c.real_heldout is None  # the held-out split is the reference: the floor stands in for the real row
    assert any("no real held-out row" in n for n in c.notes)

    markdown = Path(c.markdown_path).read_text()
    assert DIGITS_LABEL in markdown and c.feature_extractor in markdown and "digits-native" in markdown
    for row in (c.tdc, c.baseline):  # every seed's number is printed: nothing picked
        assert all(f"{s.fid:.3f}" in markdown for s in row.eval.per_seed)
    assert "| tdc |" in markdown and "| baseline |" in markdown and "real-vs-real floor" in markdown
    saved = json.loads(Path(c.json_path).read_text())
    assert Comparison.model_validate(saved) == c
    assert len(saved["tdc"]["eval"]["per_seed"]) == len(env["setup"].seeds)
    assert Path(c.plot_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The held-out evaluator and the bound: a router of two copies of the trained model is the
    # trained model, on the same triples, so its numbers equal the trained model's scored alone.
    alone, _ = score_heldout_models([("trained", env["trained"])], diffusion=env["diffusion"], images=env["heldout"],
                                    setup=c.setup, boundaries=[0, T // 2, T])
    h = {s.name: s for s in c.heldout}
    assert set(h) == {"tdc", "baseline"} and h["tdc"].eps_mse == pytest.approx(alone[0].eps_mse, rel=1e-6)
    lk = {s.name: s for s in c.likelihood}
    assert sum(lk["tdc"].group_bpd) + lk["tdc"].prior_bpd == pytest.approx(lk["tdc"].bpd)
    # A trained model beats an untrained one on every held-out metric, with intervals that say so.
    assert all(d.ci_high < 0 for d in (*c.heldout_differences, *c.likelihood_differences))
    assert {d.metric for d in c.heldout_differences} == {"eps_mse", "x0_mse", "eps_mse_min_snr"}
    assert c.fid_difference_ci.high < 0 and c.real_floor.n == c.setup.num_samples
    q = {s.name: s for s in c.sample_quality}
    assert q["tdc"].precision > q["baseline"].precision and q["tdc"].memorized_share is None  # no training images
    for section in ("Held-out denoising error", "bits/dim", "Paired differences", "real-vs-real floor",
                    "TDC better", "precision"):
        assert section in markdown, section


def test_compare_run_over_a_run_folder(tmp_path, tmp_path_factory):
    """The ``tdc compare`` path: stages → costs → ensemble vs baseline checkpoint, all from disk;
    and the ensemble scored alone."""
    overrides = ["train.steps=4", "profile.profile_steps=2", "finetune.steps=2", "grouping.num_groups=2",
                 "profile.num_buckets=4", "eval.num_samples=8", "eval.seeds=[0,1]", "sample.steps=4",
                 f"eval.cache_dir={tmp_path_factory.getbasetemp() / 'tdc-cache'}"]
    cfg = load_config(preset="smoke", overrides=overrides)
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(CheckpointError, match="baseline checkpoint .* does not exist; train the single-model"):
        compare_run(cfg, layout, baseline_checkpoint=tmp_path / "none.pt")
    stages.profile_stage(cfg, layout)
    grouped = stages.group_stage(cfg, layout)
    stages.shared_stage(cfg, layout)
    for g in range(grouped.grouping.num_groups):
        stages.finetune_group_stage(cfg, layout, group=g)
    baseline = run_training(load_config(preset="smoke", overrides=[*overrides, "train.steps=2"]),
                            run_dir=tmp_path / "baseline")
    c = compare_run(cfg, layout, baseline_checkpoint=baseline.checkpoint)
    assert Path(c.markdown_path).parent == layout.root / "eval"
    assert c.tdc.cost.training_flops == pytest.approx(stages.cost_stage(cfg, layout).training.tdc_flops)
    assert c.baseline.cost.sampling_flops_per_image == pytest.approx(4 * c.baseline.cost.forward_flops[0])
    assert len(c.tdc.cost.forward_flops) == 2
    assert any("of TDC's training FLOPs" in n for n in c.notes)  # a 2-step baseline is under-trained: said
    # The shared model is scored on held-out data beside them, per group of the run's boundaries.
    assert [h.name for h in c.heldout] == ["tdc", "shared", "baseline"]
    assert all(h.boundaries == grouped.grouping.boundaries and len(h.group_eps_mse) == 2 for h in c.heldout)
    assert {(d.b, d.metric) for d in c.likelihood_differences} == {("baseline", "bpd"), ("shared", "bpd")}
    assert all(q.memorized_share is not None and Path(q.nearest_png).is_file() for q in c.sample_quality)
    other = load_config(preset="smoke", overrides=[*overrides, "diffusion.num_timesteps=50"])
    wrong = run_training(other, run_dir=tmp_path / "other", steps=1)
    with pytest.raises(ConfigError, match="different diffusion config"):
        compare_run(cfg, layout, baseline_checkpoint=wrong.checkpoint)

    # TDC alone (baseline.enabled=false): the same numbers for TDC as beside the baseline (same
    # seeds, noise and held-out draws), none of the baseline's, differences only against shared.
    alone = compare_run(cfg, layout, baseline_checkpoint=None, out_dir=tmp_path / "alone")
    assert alone.baseline is None and alone.fid_difference is None and alone.fid_difference_ci is None
    assert alone.sampling_flops_ratio is None and alone.training_flops_ratio is None
    assert [p.fid for p in alone.tdc.eval.per_seed] == pytest.approx([p.fid for p in c.tdc.eval.per_seed])
    assert alone.tdc.cost == c.tdc.cost
    assert [h.name for h in alone.heldout] == ["tdc", "shared"]
    assert alone.heldout[0].eps_mse == pytest.approx(c.heldout[0].eps_mse)
    assert {(d.b, d.metric) for d in alone.likelihood_differences} == {("shared", "bpd")}
    assert alone.likelihood_differences[0].difference == pytest.approx(
        next(d.difference for d in c.likelihood_differences if d.b == "shared"))
    assert [q.name for q in alone.sample_quality] == ["tdc"]
    assert Comparison.model_validate_json(Path(alone.json_path).read_text()) == alone
    markdown = Path(alone.markdown_path).read_text()
    assert "TDC alone (no baseline)" in markdown and "| baseline |" not in markdown and "TDC − baseline" not in markdown
    assert Path(alone.plot_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = replicate_metrics(alone)
    assert metrics["baseline"] == {} and metrics["tdc"] == replicate_metrics(c)["tdc"]


def test_with_the_training_split_as_reference_the_held_out_images_are_scored_as_real(env, tmp_path):
    """The training split as the FID reference: the held-out images are real images it does not
    hold, scored as the "real held-out" row (with the held-out split as reference there is none,
    and a note says the floor stands in)."""
    info = env["reference"].info.model_copy(update={"split": "train"})
    reference = type(env["reference"])(info=info, stats=env["reference"].stats, features=env["reference"].features,
                                       reused=True)
    cost = ContenderCost(forward_flops=[1e6], sampling_flops_per_image=1e7, training_flops=1e12, training_detail="t")
    setup = EvalSetup.from_config(env["cfg"], seeds=[0])
    c = compare(tdc=Contender(name="tdc", model=env["trained"], cost=cost),
                baseline=Contender(name="baseline", model=env["untrained"], cost=cost), diffusion=env["diffusion"],
                setup=setup, image_shape=(1, 8, 8), extractor=env["extractor"], reference=reference, out_dir=tmp_path,
                heldout_images=env["heldout"][:8], boundaries=[0, env["cfg"].diffusion.num_timesteps])
    assert c.real_heldout is not None and c.real_heldout.num_images == 8
    assert not any("no real held-out row" in n for n in c.notes)
