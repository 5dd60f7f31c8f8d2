"""Stage 1 from an openai/improved-diffusion checkpoint (``train.init_from``, ``tdc import-iddpm``).

No external file: IDDPM-named state dicts are built from our own models by the inverse mapping,
and IDDPM's attention (qkv rows as (head, q/k/v, d), split per head) is re-derived here from its
definition, so a wrong permutation cannot pass by being its own inverse.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flows.cli import main
from tdc_core.config import load_config
from tdc_core.diffusion.gaussian import Diffusion
from tdc_core.diffusion.samplers import sample
from tdc_core.errors import CheckpointError
from tdc_core.model.iddpm import from_iddpm_state_dict, iddpm_names, to_iddpm_state_dict
from tdc_core.model.unet import AttentionBlock, UNet, UNetSpec, timestep_embedding
from tdc_core.run import stages
from tdc_core.run.layout import RunLayout
from tdc_core.run.outline import run_stages
from tdc_core.run.preflight import preflight
from tdc_core.training.checkpoint import load_checkpoint, save_checkpoint
from tdc_core.training.import_iddpm import imported_checkpoint
from tdc_core.training.trainer import load_model, spec_for

# The smoke model with IDDPM's learned Σ and timestep rescaling (T = 100 → the network sees 10·t).
HYBRID = ["diffusion.loss=hybrid", "diffusion.rescale_timesteps=true"]


def _randomized(model: UNet, seed: int = 0) -> UNet:
    """Every parameter random: the zero-initialised output convolutions of a fresh UNet would
    make attention and residual branches invisible in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _model(overrides=(), seed: int = 0) -> tuple[UNet, object]:
    cfg = load_config(preset="smoke", overrides=[*HYBRID, *overrides])
    return _randomized(UNet(spec_for(cfg)), seed), cfg


def _iddpm_file(tmp_path, model: UNet, name: str = "iddpm.pt"):
    path = tmp_path / name
    torch.save(to_iddpm_state_dict(model), path)  # what improved-diffusion releases: a bare state dict
    return path


def test_iddpm_names_follow_improved_diffusion():
    model, _ = _model()
    names = set(iddpm_names(model).values())
    for key in ("time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",  # the bare stem conv
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
                "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.0.bias",
                "input_blocks.1.0.out_layers.3.weight", "input_blocks.2.0.op.weight",  # Downsample
                "middle_block.1.qkv.weight", "middle_block.1.proj_out.bias", "middle_block.1.norm.weight",
                "output_blocks.1.2.conv.weight",  # Upsample (after res + attention)
                "out.0.weight", "out.2.bias"):
        assert key in names, key
    # A 1×1 skip only where the width changes (IDDPM's skip_connection).
    assert "input_blocks.3.0.skip_connection.weight" in names
    assert not any(k.startswith("input_blocks.1.0.skip_connection") for k in names)


def test_round_trip_gives_identical_weights_and_outputs():
    model, cfg = _model()
    state = to_iddpm_state_dict(model)
    back = UNet(spec_for(cfg)).eval()
    back.load_state_dict(from_iddpm_state_dict(state, model=back))
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 17, 50, 99])
    with torch.no_grad():
        assert torch.equal(back(x, t), model(x, t))


def _iddpm_attention(x: torch.Tensor, state: dict, prefix: str, heads: int, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """IDDPM's AttentionBlock from its definition: qkv rows (head, q/k/v, d); per head
    softmax(qᵀk/√d) v; proj_out; residual."""
    b, c, h, w = x.shape
    qkv = F.conv1d(norm(x).reshape(b, c, h * w), state[f"{prefix}.qkv.weight"], state[f"{prefix}.qkv.bias"])
    qkv = qkv.reshape(b * heads, -1, h * w)
    d = qkv.shape[1] // 3
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, h * w)
    out = F.conv1d(a, state[f"{prefix}.proj_out.weight"], state[f"{prefix}.proj_out.bias"])
    return x + out.reshape(b, c, h, w)


def test_attention_computes_what_iddpm_computes_from_the_same_weights():
    model, _ = _model()  # smoke: 2 heads, so the (head, q/k/v, d) order matters
    state = to_iddpm_state_dict(model)
    block = model.middle_block[1]
    assert isinstance(block, AttentionBlock) and block.num_heads == 2
    x = torch.randn(3, block.proj.out_channels, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = block(x)
        theirs = _iddpm_attention(x, state, "middle_block.1", heads=2, norm=block.norm)
        assert torch.allclose(ours, theirs, atol=1e-5)
        # The permutation is not a no-op: IDDPM's rows read in our order compute something else.
        naive = AttentionBlock(channels=block.proj.out_channels, inner_channels=block.proj.in_channels,
                               num_heads=2, norm_groups=8)
        naive.load_state_dict({"norm.weight": block.norm.weight, "norm.bias": block.norm.bias,
                               "qkv.weight": state["middle_block.1.qkv.weight"],
                               "qkv.bias": state["middle_block.1.qkv.bias"],
                               "proj.weight": block.proj.weight, "proj.bias": block.proj.bias})
        assert not torch.allclose(naive(x), theirs, atol=1e-3)


@pytest.mark.parametrize(("preset", "params"), [("cifar10", 52_546_438), ("imagenet64", 121_063_942)])
def test_iddpm_presets_have_the_released_models_parameter_counts(preset, params):
    cfg = load_config(preset=preset, overrides=["data.path=unused"])
    with torch.device("meta"):
        model = UNet(spec_for(cfg))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.spec.time_scale == 1000 / 4000  # IDDPM's rescale_timesteps with T = 4000


def test_rescaled_network_receives_t_times_1000_over_T():
    model, cfg = _model()
    assert model.spec.time_scale == 1000 / cfg.diffusion.num_timesteps == 10.0
    seen = []
    model.time_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    t = torch.tensor([0, 3, 99])
    model(torch.zeros(3, 1, 8, 8), t)
    expected = timestep_embedding(t.float() * 10.0, cfg.model.base_channels)
    assert torch.equal(seen[0], expected)
    # Off (the default), the raw index; and a spec saved without the field reads back as 1.
    plain = load_config(preset="smoke")
    assert spec_for(plain).time_scale == 1.0 and "time_scale" not in spec_for(plain).to_dict()
    assert UNetSpec.from_dict(model.spec.to_dict()).time_scale == 10.0


def _refused(state, model, match):
    with pytest.raises(CheckpointError, match=match) as info:
        from_iddpm_state_dict(state, model=model)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_extra_and_misshapen_keys_each_name_the_key_and_a_field():
    model, _ = _model()
    good = to_iddpm_state_dict(model)
    missing = dict(good)
    del missing["middle_block.1.qkv.weight"]
    msg = _refused(missing, model, "needs middle_block.1.qkv.weight")
    assert "model.attention_resolutions" in msg
    extra = {**good, "input_blocks.9.0.in_layers.0.weight": torch.zeros(3)}
    msg = _refused(extra, model, "has input_blocks.9.0.in_layers.0.weight, which the model lacks")
    assert "model.num_res_blocks" in msg
    eps_only = {**good, "out.2.weight": good["out.2.weight"][:1], "out.2.bias": good["out.2.bias"][:1]}
    _refused(eps_only, model, r"out\.2\.weight is \[1, 16, 3, 3\] in the checkpoint.*diffusion\.loss=eps_mse")
    conditional = {**good, "label_emb.weight": torch.zeros(10, 64)}
    _refused(conditional, model, "class-conditional")


def test_a_wrong_preset_is_refused_naming_the_first_mismatch():
    model, _ = _model()
    state = to_iddpm_state_dict(model)
    other = UNet(spec_for(load_config(preset="smoke", overrides=[*HYBRID, "model.base_channels=32"])))
    msg = _refused(state, other, r"time_embed\.0\.weight is \[64, 16\] in the checkpoint and \[128, 32\]")
    assert "model.base_channels" in msg and "more mismatch" in msg
    eps_model = UNet(spec_for(load_config(preset="smoke")))  # ε-only, unscaled: a learned-Σ checkpoint
    _refused(state, eps_model, "diffusion.loss=hybrid")


def test_files_that_are_not_iddpm_state_dicts_are_refused(tmp_path):
    model, cfg = _model()
    init = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": str(tmp_path / "x.pt")})})
    with pytest.raises(CheckpointError, match="does not exist"):
        imported_checkpoint(init, tmp_path / "x.pt", spec=spec_for(init))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        imported_checkpoint(init, tmp_path / "junk.pt", spec=spec_for(init))
    torch.save({"model": to_iddpm_state_dict(model)}, tmp_path / "nested.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        imported_checkpoint(init, tmp_path / "nested.pt", spec=spec_for(init))
    save_checkpoint(tmp_path / "tdc.pt", {"kind": "snapshot"})
    with pytest.raises(CheckpointError, match="is a TDC checkpoint"):
        imported_checkpoint(init, tmp_path / "tdc.pt", spec=spec_for(init))


class _Payload:  # a pickled object: weights_only loading must refuse it, never run it
    pass


def test_a_file_carrying_objects_is_refused_without_running_them(tmp_path):
    _, cfg = _model()
    torch.save({"x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        imported_checkpoint(cfg, tmp_path / "evil.pt", spec=spec_for(cfg))


def test_import_command_then_pipeline_stages_fine_tune_and_sample_a_learned_variance_model(tmp_path, capsys):
    source, _ = _model(seed=3)
    src = _iddpm_file(tmp_path, source)
    run = tmp_path / "run"
    overrides = [*HYBRID, "train.steps=12", "profile.profile_steps=4", "finetune.steps=3"]
    assert main(["import-iddpm", str(src), "--preset", "smoke", "--out-dir", str(run), *overrides]) == 0
    out = capsys.readouterr().out
    assert "every key and shape matched" in out and f"tdc run --run-dir {run}" in out
    layout = RunLayout(run)
    ckpt = load_checkpoint(layout.shared_checkpoint)
    assert ckpt["step"] == 12 and ckpt["imported"]["format"] == "improved-diffusion"
    imported = load_model(layout.shared_checkpoint).model
    for k, v in source.state_dict().items():
        assert torch.equal(imported.state_dict()[k], v), k  # EMA = the IDDPM weights, bit for bit
    # A second import into the same folder never overwrites its stage 1.
    assert main(["import-iddpm", str(src), "--preset", "smoke", "--out-dir", str(run), *overrides]) == 2

    from tdc_core.config import read_run_config

    cfg = read_run_config(layout)
    assert cfg.train.init_from == str(src.resolve()) and cfg.learn_sigma
    done = run_stages(cfg, layout, until="finetune")
    assert done.profile.model_step == 12  # the imported model was profiled; nothing was trained
    assert done.shared.resumed_from == 12 and done.shared.step == 12
    assert all(g.steps == 3 and math.isfinite(g.heldout_loss) for g in done.groups)
    assert any(g.pruned for g in done.groups)  # the learned-Σ output layer survives pruning
    router = stages.assemble_router(layout)
    diffusion = Diffusion.from_config(cfg.diffusion).respaced(5)
    x = sample(router, diffusion, shape=(4, 1, 8, 8), generator=torch.Generator().manual_seed(0), sampler="ddpm")
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    costs = stages.cost_stage(cfg, layout)
    assert costs.stage1_imported is not None and "did not run here" in costs.stage1_imported


def test_pipeline_option_imports_when_stage_1_is_missing_and_preflight_checks_it_first(tmp_path):
    source, _ = _model(seed=4)
    src = _iddpm_file(tmp_path, source)
    cfg = load_config(preset="smoke", overrides=[*HYBRID, f"train.init_from={src}", "profile.profile_steps=4"])
    lines = preflight(cfg, run_dir=None, needs={"data"})
    assert any("fits the model" in line for line in lines)
    layout = RunLayout(tmp_path / "run")
    done = run_stages(cfg, layout, until="shared")
    assert done.shared.step == cfg.train.steps and done.shared.resumed_from == cfg.train.steps
    bad = cfg.model_copy(update={"model": cfg.model.model_copy(update={"base_channels": 32})})
    with pytest.raises(CheckpointError, match="model.base_channels"):
        preflight(bad, run_dir=None, needs={"data"})


def test_a_study_plan_says_an_imported_stage_1_is_charged_but_not_run(tmp_path, monkeypatch):
    from flows.study import plan_lines
    from tdc_core.run.study import Arm, StudySpec

    monkeypatch.chdir(tmp_path)  # run folders are relative: none of a developer's runs/ is seen

    arm = Arm(name="in64", preset="imagenet64",
              overrides=("data.path=/data/in64", "train.init_from=/ckpt/imagenet64_uncond_100M_1500K.pt"))
    lines = plan_lines(StudySpec(name="plan", arms=(arm,), seeds=(0,)))
    assert "stage 1 imported from /ckpt/imagenet64_uncond_100M_1500K.pt" in lines[1] and "not run" in lines[1]
    assert "imported (IDDPM's published training, not run here)" in lines[-1]
    trained = plan_lines(StudySpec(name="plan", arms=(Arm(name="d"),), seeds=(0,)))
    assert "stage 1 trained here" in trained[1] and "imported" not in trained[-1]
