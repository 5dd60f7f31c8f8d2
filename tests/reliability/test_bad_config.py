"""Bad configuration: every wrong key, type, range or combination is one ConfigError line that
names the field and what is allowed, never a library traceback; garbage in any form (files,
overrides) either loads to a valid config or is refused that way."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flows.cli import main as cli_main
from tdc_core.config import (
    PRESETS,
    PipelineConfig,
    load_config,
    validate_config,
)
from tdc_core.errors import ConfigError
from tdc_core.method.budgets import check_budgets_reachable

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _field_paths(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[str]:
    """Every dotted field of the config tree (``train.lr``, ``model.channel_mult``...)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _field_paths(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


PATHS = _field_paths()
SECTIONS = sorted({p.split(".")[0] for p in PATHS if "." in p})
KEY_WORDS = sorted({part for p in PATHS for part in p.split(".")})


def _assert_refused_in_one_line(exc: ConfigError, *needles: str) -> None:
    text = str(exc)
    assert text and "\n" not in text, f"not one line: {text!r}"
    for needle in needles:
        assert needle in text, f"{needle!r} missing from: {text}"


def _loads_or_refuses(**kwargs: Any) -> PipelineConfig | None:
    """The loader's contract: a valid config that survives its own round trip (as it is stored in
    checkpoints and run folders), or one ConfigError line; any other exception fails the test."""
    try:
        cfg = load_config(**kwargs)
    except ConfigError as exc:
        _assert_refused_in_one_line(exc)
        return None
    assert isinstance(cfg, PipelineConfig)
    assert validate_config(json.loads(cfg.model_dump_json())) == cfg
    return cfg


# --- garbage in, ConfigError out (hypothesis) --------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["1e-3", ".inf", "-.nan", "~", "yes", "0x10", "[1, 2", "{a:", "../../etc", "digits", "llm"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEY_WORDS) | st.text(max_size=6),
                                                                inner, max_size=4),
    max_leaves=12,
)
# Mostly real section/field names, so that the garbage reaches deep into the schema.
_trees = st.dictionaries(
    st.sampled_from(SECTIONS + ["name", "preset"]) | st.text(max_size=6),
    st.dictionaries(st.sampled_from(KEY_WORDS) | st.text(max_size=6), _values, max_size=5) | _values,
    max_size=5,
)


@FUZZ
@given(tree=_trees, fmt=st.sampled_from(["yaml", "json", "text", "bytes"]), junk=st.text(max_size=60),
       raw=st.binary(max_size=60))
def test_any_config_file_loads_or_is_one_config_error(tmp_path: Path, tree, fmt, junk, raw) -> None:
    path = tmp_path / ("c.json" if fmt == "json" else "c.yaml")
    if fmt == "yaml":
        path.write_text(yaml.safe_dump(tree))
    elif fmt == "json":
        path.write_text(json.dumps(tree))  # NaN/Infinity included: Python's json reads them back
    elif fmt == "text":
        path.write_text(junk)
    else:
        path.write_bytes(raw)
    _loads_or_refuses(preset="smoke", path=path)


_override_keys = st.one_of(
    st.sampled_from(PATHS),
    st.sampled_from(PATHS).map(lambda p: p + ".x"),  # too deep
    st.sampled_from(SECTIONS),                        # a whole section
    st.text(alphabet="ab.=_ ", max_size=8),           # empty segments, stray "=", spaces
)
# Plausible values too, so that a fair share of examples is valid and the round trip is tested.
_plausible = st.one_of(
    st.integers(0, 20), st.floats(0.0, 1.0), st.booleans(),
    st.sampled_from(["cosine", "ddim", "ddpm", "taylor", "magnitude", "loss", "snr", "random", "auto", "cpu",
                     "[1, 2]", "[4]", "[]", "null", "my-run.v2"]),
).map(str)
_override_values = st.one_of(_plausible, _plausible, _values.map(lambda v: json.dumps(v)), st.text(max_size=12))
_DEFAULTS = load_config(preset="smoke").model_dump(mode="json")


def _near_default(path: str) -> list[str]:
    """``path=value`` overrides at and around the smoke preset's value (often valid)."""
    value: Any = _DEFAULTS
    for part in path.split("."):
        value = value[part]
    near = [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        near += [type(value)(value * f) for f in (0, 0.5, 2, -1)]
    elif isinstance(value, list):
        near += [value[:1], value + value[-1:]]
    return [f"{path}={json.dumps(v)}" for v in near]


_overrides = st.lists(
    st.one_of(st.tuples(_override_keys, _override_values).map("=".join),
              st.sampled_from(PATHS).flatmap(lambda p: st.sampled_from(_near_default(p))),
              st.text(max_size=15)),
    max_size=3,
)


@FUZZ
@given(overrides=_overrides, preset=st.sampled_from(sorted(PRESETS)))
def test_any_dotted_overrides_load_or_are_one_config_error(overrides, preset) -> None:
    _loads_or_refuses(preset=preset, overrides=["data.path=/data/x", *overrides])


_model_overrides = st.fixed_dictionaries({
    "model.base_channels": st.integers(1, 24),
    "model.channel_mult": st.lists(st.integers(1, 3), min_size=1, max_size=3),
    "model.num_heads": st.integers(1, 7),
    "model.num_head_channels": st.none() | st.integers(1, 40),
    "model.attention_resolutions": st.lists(st.sampled_from([1, 2, 4, 8, 16]), max_size=2),
    "model.norm_groups": st.integers(1, 32),
    "model.resblock_updown": st.booleans(),
    "data.image_size": st.sampled_from([4, 6, 8, 12, 16]),
    "diffusion.loss": st.sampled_from(["eps_mse", "hybrid"]),
})


@settings(max_examples=60, deadline=None, database=None)
@given(values=_model_overrides)
def test_every_accepted_model_config_builds_and_runs_its_unet(values) -> None:
    """What validation accepts, the UNet can build and run, even on a batch of one image (as
    `tdc sample --num 1` does): no architecture error waits for the first training step
    (on the meta device: no weights, no compute)."""
    from tdc_core.model.unet import UNet
    from tdc_core.training.trainer import spec_for

    cfg = _loads_or_refuses(preset="smoke", overrides=[f"{k}={json.dumps(v)}" for k, v in values.items()])
    if cfg is None:
        return
    size = cfg.data.image_size
    with torch.device("meta"):
        model = UNet(spec_for(cfg))
        out = model(torch.zeros(1, cfg.data.channels, size, size), torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, cfg.data.channels * (2 if cfg.learn_sigma else 1), size, size)


# --- named refusals ----------------------------------------------------------------------------
# Only what tests/test_config.py does not already cover.


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["train.lr=.inf"], ["train.lr", "finite"]),
        (["budget.k=.nan"], ["budget.k", "finite"]),
        (["train.steps=true"], ["train.steps", "integer", "'true'"]),  # not silently 1 step
        (["finetune.lr=yes"], ["finetune.lr", "number"]),
        (["train.seed=-1"], ["train.seed", "greater than or equal to 0"]),
        (["eval.seeds=[0, -3]"], ["eval.seeds", "greater than or equal to 0"]),
        (["model.channel_mult=[-1, 2]"], ["model.channel_mult", "greater than or equal to 1"]),
        (["model.base_channels=1"], ["model.base_channels", "greater than or equal to 2"]),
        (["model.num_heads=3"], ["model.num_heads=3", "32 channels", "allowed"]),
        (["model.num_head_channels=5"], ["model.num_head_channels=5", "heads", "allowed"]),
        (["grouping.num_groups=0"], ["grouping.num_groups", "greater than or equal to 1"]),
        (["grouping.num_groups=4", "grouping.min_group_buckets=3"], ["grouping.min_group_buckets", "12"]),
        (["data.image_size=9"], ["data.image_size=9", "divisible by 2"]),
        (["data.image_size=4", "model.channel_mult=[1,2,2]", "model.attention_resolutions=[]"],
         ["data.image_size=4", "1x1", "allowed: image_size >= 8"]),
        (["prune.proxy=llm"], ["prune.proxy=llm", "prune.llm_url"]),
        (["prune.proxy=llm", "prune.llm_url=file:///etc/passwd"], ["prune.llm_url", "http"]),
        (["prune.llm_api_key_env=sk-live-123"], ["prune.llm_api_key_env", "pattern"]),  # a key, not a name
        (["name=../../etc"], ["name='../../etc'", "allowed", "letters"]),
        (["name=a/b"], ["name='a/b'", "allowed"]),
        (["name=.hidden"], ["name='.hidden'", "starting with a letter"]),
        (["name="], ["name", "valid string"]),
        (["preset=../../../tmp/x"], ["preset='../../../tmp/x'", "allowed: smoke"]),
        (["train=3", "train.lr=1"], ["train", "not a section"]),
        (["train.lr=abc", "budget.k=3"], ["train.lr", "budget.k", "; "]),  # every error, one line
    ],
)
def test_bad_values_are_one_line_naming_field_and_what_is_allowed(overrides, needles) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", overrides=overrides)
    _assert_refused_in_one_line(err.value, *needles)


def test_prune_proxy_llm_without_url_is_fine_when_pruning_is_off() -> None:
    load_config(preset="smoke", overrides=["prune.proxy=llm", "prune.enabled=false"])


def test_file_can_not_smuggle_a_path_in_the_preset_name(tmp_path: Path) -> None:
    """The preset is part of the default run folder (runs/<name>-<preset>-<hash>)."""
    f = tmp_path / "c.yaml"
    f.write_text("preset: ../../../../tmp/escape\n")
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", path=f)
    _assert_refused_in_one_line(err.value, "preset", "allowed")


def test_unparsable_yaml_is_one_line_naming_the_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  lr: [1,\n  steps: {\n")  # YAML's own message spans several lines
    with pytest.raises(ConfigError) as err:
        load_config(preset="smoke", path=f)
    _assert_refused_in_one_line(err.value, "broken.yaml", "YAML")


# --- budgets that pruning cannot reach ---------------------------------------------------------


def _suggested_k(message: str) -> float:
    return float(re.search(r"budget\.k >= ([0-9.]+)", message).group(1))


def test_unreachable_budget_is_refused_and_the_suggested_k_is_tight() -> None:
    """k = 0.1 on the smoke model asks 0.4 F of the easiest group, below what min_keep allows.
    The message's smallest k passes and anything 0.002 lower fails."""
    cfg = load_config(preset="smoke", overrides=["budget.k=0.1"])
    with pytest.raises(ConfigError) as err:
        check_budgets_reachable(cfg)
    _assert_refused_in_one_line(err.value, "budget.k=0.1", "prune.min_keep=0.1", "allowed: budget.k >=")
    k = _suggested_k(str(err.value))
    assert 0.1 < k < 0.5
    check_budgets_reachable(load_config(preset="smoke", overrides=[f"budget.k={k}"]))
    with pytest.raises(ConfigError):
        check_budgets_reachable(load_config(preset="smoke", overrides=[f"budget.k={k - 0.002:.3f}"]))
    # The other ways out that the message names.
    for way_out in (["prune.enabled=false"], ["grouping.num_groups=1"]):
        check_budgets_reachable(load_config(preset="smoke", overrides=["budget.k=0.1", *way_out]))
    with pytest.raises(ConfigError, match="prune.min_keep=0.5"):
        check_budgets_reachable(load_config(preset="smoke", overrides=["budget.k=0.2", "prune.min_keep=0.5"]))
    check_budgets_reachable(load_config(preset="smoke", overrides=["budget.k=0.2", "prune.min_keep=0.1"]))
    # Widths in multiples of 8 leave the smoke model's 16-wide blocks at no less than half.
    with pytest.raises(ConfigError, match="prune.width_multiple=8"):
        check_budgets_reachable(load_config(preset="smoke", overrides=["budget.k=0.2", "prune.width_multiple=8"]))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_reachable_budgets(preset: str) -> None:
    check_budgets_reachable(load_config(preset=preset, overrides=["data.path=/data/x"]))


def test_config_check_agrees_with_the_pruning_search(monkeypatch) -> None:
    """The config-time check refuses exactly the budgets prune_to_budget refuses: just below the
    suggested k both refuse; at it, the search gets past its own floor check."""
    import tdc_core.method.pruning.search as ps
    from tdc_core.diffusion.gaussian import Diffusion
    from tdc_core.method.budgets import budget_fractions
    from tdc_core.method.pruning.space import count_spec_flops
    from tdc_core.model.unet import UNet
    from tdc_core.training.trainer import spec_for

    with pytest.raises(ConfigError) as err:
        check_budgets_reachable(load_config(preset="smoke", overrides=["budget.k=0.05"]))
    k = _suggested_k(str(err.value))

    class Reached(Exception):
        pass

    def search_rounds(**_: Any) -> None:
        raise Reached

    monkeypatch.setattr(ps, "search_rounds", search_rounds)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    for kk, refused in ((round(k - 0.002, 3), True), (k, False)):
        cfg = load_config(preset="smoke", overrides=[f"budget.k={kk}"])
        fraction = budget_fractions(num_groups=cfg.grouping.num_groups, k=kk)[0]
        torch.manual_seed(0)
        model = UNet(spec_for(cfg))
        kwargs = dict(model=model, diffusion=Diffusion.from_config(cfg.diffusion), train_images=images,
                      heldout_images=images, t_range=(0, 30), config=cfg,
                      budget_flops=fraction * count_spec_flops(spec_for(cfg)))
        with pytest.raises(ConfigError if refused else Reached, match="cannot be reached" if refused else None):
            ps.prune_to_budget(**kwargs)


# --- at the CLI: exit code 2, one line on stderr, no traceback ---------------------------------


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["config", "--preset", "smoke", "budget.k=0.1"], ["budget.k=0.1", "allowed"]),
        (["config", "--preset", "smoke", "model.num_heads=3"], ["model.num_heads=3", "allowed"]),
        (["config", "--preset", "smoke", "name=../x"], ["name='../x'", "allowed"]),
        (["config", "--preset", "smoke", "train=3", "train.lr=1"], ["not a section"]),
        (["config", "--preset", "smoke", "train.steps=yes"], ["train.steps"]),
    ],
)
def test_cli_refuses_in_one_line(capsys, argv, needles) -> None:
    assert cli_main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    line = out.err.strip()
    assert "\n" not in line and line.startswith("tdc config: error: ")
    for needle in needles:
        assert needle in line, line


def test_cli_finetune_group_refuses_a_group_that_does_not_exist(tmp_path: Path, capsys) -> None:
    """A negative or too-large --group is one line, not a ValueError traceback from the stage."""
    from tdc_core.config import write_run_config
    from tdc_core.method.budgets import BudgetPlan, GroupBudget
    from tdc_core.records import save_record
    from tdc_core.run.layout import RunLayout

    layout = RunLayout(tmp_path / "run")
    write_run_config(layout, load_config(preset="smoke"))
    save_record(layout.budgets_json, BudgetPlan(base_flops=1.0, k=0.5, difficulty_measure="loss", budgets=[
        GroupBudget(group=g, lo=g * 50, hi=(g + 1) * 50, rank=g + 1, fraction=0.75 + 0.25 * g, flops_budget=1.0)
        for g in range(2)]))
    for group in ("-1", "2", "99"):
        assert cli_main(["finetune-group", "--run-dir", str(layout.root), "--group", group]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--group={group} does not exist" in err and "allowed: 0..1" in err


def _tdc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          timeout=120)


def _assert_one_line_exit_2(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2 and r.stdout == ""
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


def test_real_cli_process_refuses_an_override_in_one_line(tmp_path: Path) -> None:
    """A real `python -m flows.cli`: exit code, stderr and stdout as a user sees them."""
    r = _tdc("config", "--preset", "smoke", "budget.k=0.1", cwd=tmp_path)
    _assert_one_line_exit_2(r, "budget.k=0.1", "allowed: budget.k >=")


def test_real_cli_process_refuses_a_broken_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  channel_mult: [1, 2\n")  # YAML's own message spans four lines
    r = _tdc("config", "--preset", "smoke", "--config", str(bad), cwd=tmp_path)
    _assert_one_line_exit_2(r, "bad.yaml", "cannot be parsed as YAML")
