"""The configuration tree: presets, files, dotted overrides and clear errors."""

from __future__ import annotations

import json

import pytest

from tdc_core.config import (
    PRESETS,
    PipelineConfig,
    flatten,
    load_config,
    validate_config,
)
from tdc_core.errors import ConfigError


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates(preset):
    cfg = load_config(preset=preset, overrides=["data.path=/data/x"])
    assert cfg.preset == preset


def test_paper_presets_match_iddpm():
    c = load_config(preset="imagenet64", overrides=["data.path=/d"])
    assert (c.model.base_channels, c.model.num_res_blocks, c.model.channel_mult) == (128, 3, (1, 2, 3, 4))
    assert c.model.attention_resolutions == (16, 8)
    assert (c.diffusion.schedule, c.diffusion.num_timesteps, c.diffusion.loss) == ("cosine", 4000, "hybrid")
    assert (c.train.lr, c.train.batch_size) == (1e-4, 128)
    c = load_config(preset="cifar10", overrides=["data.path=/d"])
    assert (c.model.channel_mult, c.model.dropout) == ((1, 2, 2, 2), 0.3)


def test_overrides_are_typed_and_win_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.01\n  steps: 17\n")
    cfg = load_config(preset="smoke", path=f, overrides=["train.lr=2e-4", "model.channel_mult=[1,2]"])
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 17
    assert cfg.model.channel_mult == (1, 2)


def test_json_file_is_read(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"batch_size": 3}}))
    assert load_config(preset="smoke", path=f).train.batch_size == 3


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["train.lr=-1"], ["train.lr", "greater than 0", "-1"]),
        (["train.lrr=1"], ["train.lrr", "allowed", "lr"]),
        (["nope=1"], ["nope", "allowed", "train"]),
        (["train.steps=abc"], ["train.steps", "integer", "abc"]),
        (["budget.k=1.5"], ["budget.k", "1.5"]),
        (["budget.k=0"], ["budget.k"]),
        (["data.image_size=10", "model.channel_mult=[1,2,2]", "model.attention_resolutions=[]"],
         ["data.image_size=10", "divisible by 4"]),
        (["model.attention_resolutions=[5]"], ["attention_resolutions", "allowed"]),
        (["data.source=npz"], ["data.path", "required"]),
        (["grouping.num_groups=11"], ["grouping.num_groups", "profile.num_buckets"]),
        (["grouping.min_group_buckets=4"], ["min_group_buckets"]),
        (["train.steps=-5"], ["train.steps"]),
        (["profile.profile_steps=1000"], ["profile.profile_steps", "train.steps"]),
        (["sample.steps=1000"], ["sample.steps", "num_timesteps"]),
        (["train"], ["train", "section.field=value"]),
        (["diffusion.schedule=linear", "diffusion.num_timesteps=20", "sample.steps=5",
          "profile.num_buckets=10"], ["num_timesteps=20", "linear", "≥ 21"]),
        (["train.lr.x=1"], ["train.lr", "not a section"]),
    ],
)
def test_bad_values_name_the_field(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", overrides=overrides)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'bogus'; allowed: smoke"):
        load_config(preset="bogus")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(preset="smoke", path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(preset="smoke", path=bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(preset="smoke", path=scalar)


def test_unknown_key_in_file_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train.learning_rate: unknown key; allowed: .*lr"):
        load_config(preset="smoke", path=f)


def test_round_trip_through_json_and_flatten():
    cfg = load_config(preset="digits")
    again = validate_config(json.loads(cfg.model_dump_json()))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["train.lr"] == str(cfg.train.lr)
    assert flat["model.channel_mult"] == "[1, 2]"
    assert len(flat) == sum(len(type(getattr(cfg, s)).model_fields) for s in PipelineConfig.model_fields
                            if s not in ("name", "preset")) + 2
