"""What one job may cost (services/bounds.py), and the numbers a config may hold at all (config.py)."""

import argparse
import importlib.util
import json
import math

import pytest
import torch
from pydantic import ValidationError

from api.problems import status_of
from services.bounds import COUNT_LIMITS, VALUE_LIMITS, check_bounds
from services.errors import InputError
from services.method.config import SEED_LIMIT, LadderConfig
from services.method.stages import STAGES, stage_seed
from services.settings import Settings, get_settings
from services.uploads import parse_config

from .harness import ROOT

DEFAULTS = Settings()


def _with(path: str, value) -> dict:
    """A config dict that sets one dotted field."""
    *parents, leaf = path.split(".")
    out = node = {}
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return out


def _refusal(config: dict, settings: Settings = DEFAULTS) -> str:
    with pytest.raises(InputError) as e:
        check_bounds(LadderConfig.model_validate(config), settings)
    assert status_of(e.value) == 422 and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(("path", "setting"), VALUE_LIMITS)
def test_every_value_bound_is_refused_with_its_field_value_limit_and_setting(path, setting):
    limit = getattr(DEFAULTS, setting)
    check_bounds(LadderConfig.model_validate(_with(path, limit)), DEFAULTS)  # at the limit: admitted
    message = _refusal(_with(path, limit + 1))
    assert message == (f"config: {path} = {limit + 1:,} is above the limit of {limit:,}; "
                       f"send at most {limit:,} (an operator can raise the limit with LADDER_{setting.upper()})")


@pytest.mark.parametrize(("path", "setting"), COUNT_LIMITS)
def test_every_count_bound_is_refused_with_its_field_count_limit_and_setting(path, setting):
    limit = getattr(DEFAULTS, setting)
    values = {"perturb.eps": [float(i + 1) for i in range(limit + 1)],
              "perturb.crossing_quantiles": [(i + 1) / (limit + 2) for i in range(limit + 1)]}
    if path == "variants":  # only six exist, all admitted by default: a tighter operator
        tight = DEFAULTS.model_copy(update={setting: 2})
        message = _refusal({"variants": ["fgsm_at", "pgd_at", "trades"]}, tight)
        assert message == ("config: variants has 3 values, above the limit of 2; send at most 2 "
                           "(an operator can raise the limit with LADDER_MAX_VARIANTS)")
        return
    check_bounds(LadderConfig.model_validate(_with(path, values[path][:limit])), DEFAULTS)
    message = _refusal(_with(path, values[path]))
    assert message == (f"config: {path} has {limit + 1:,} values, above the limit of {limit:,}; "
                       f"send at most {limit:,} (an operator can raise the limit with LADDER_{setting.upper()})")


def test_the_huge_values_of_the_finding_are_refused():
    assert "finetune.epochs = 1,000,000,000 is above the limit of 100" in _refusal({"finetune": {"epochs": 10**9}})
    assert "LADDER_MAX_STEPS" in _refusal({"evaluate": {"cw": {"max_iter": 10**7}}})


def test_a_raised_setting_admits_a_larger_value(monkeypatch):
    big = {"finetune": {"epochs": 500}, "evaluate": {"attack": {"pgd_steps": 5000}, "max_samples": 100_000}}
    _refusal(big)
    raised = Settings(max_epochs=500, max_steps=5000, max_samples=100_000)
    check_bounds(LadderConfig.model_validate(big), raised)
    monkeypatch.setenv("LADDER_MAX_EPOCHS", "500")  # as an operator sets it
    monkeypatch.setenv("LADDER_MAX_STEPS", "5000")
    monkeypatch.setenv("LADDER_MAX_SAMPLES", "100000")
    check_bounds(LadderConfig.model_validate(big), Settings())


def test_the_defaults_and_null_sample_counts_pass():
    check_bounds(LadderConfig(), DEFAULTS)
    check_bounds(LadderConfig(), None)  # the process's settings (the CLI's path)
    every_null = {"perturb": {"samples_per_class": None}, "evaluate": {"max_samples": None, "cw": {"max_samples": None},
                                                                      "jsma": {"max_samples": None},
                                                                      "autoattack": {"max_samples": None}}}
    check_bounds(LadderConfig.model_validate(every_null), DEFAULTS)  # "all": bounded by the upload caps


def _paper_bench():
    spec = importlib.util.spec_from_file_location("paper_mnist_for_bounds", ROOT / "bench" / "paper_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("core", [False, True])
def test_the_paper_bench_configs_pass(smoke, core):
    bench = _paper_bench()
    args = argparse.Namespace(seed=2, core=core, smoke=smoke, sources_per_class=450, finetune_epochs=3, cw_per_class=50,
                              autoattack_per_class=100, random_share=None, crossing_quantiles=None)
    cfg = bench.configure(args)
    assert cfg.evaluate.max_samples is None and cfg.generator.time_budget_s == 1e9  # what it sets: see bench/paper_mnist.py
    check_bounds(cfg, DEFAULTS)
    for change in bench.EXTRA_LADDERS.values():  # its extra LADDER rows
        check_bounds(cfg.model_copy(update={"perturb": bench.changed(cfg.perturb, change)}), DEFAULTS)
    # and the authors' 100 fine-tuning epochs (method.md), on all 60,000 training digits per class at most
    check_bounds(cfg.model_copy(update={"finetune": bench.changed(cfg.finetune, {"epochs": 100})}), DEFAULTS)


NON_FINITE = [
    ("generator.time_budget_s", math.inf), ("finetune.lr", math.nan), ("evaluate.cw.confidence", -math.inf),
    ("evaluate.jsma.theta", math.nan), ("baselines.trades_beta", math.inf), ("perturb.eps", [1.0, math.inf]),
    ("perturb.crossing_quantiles", [0.5, math.nan]),
]


@pytest.mark.parametrize(("path", "value"), NON_FINITE)
def test_nan_and_infinity_are_refused_anywhere(path, value):
    with pytest.raises(ValidationError) as e:
        LadderConfig.model_validate(_with(path, value))
    first = e.value.errors()[0]
    assert ".".join(str(p) for p in first["loc"]).startswith(path) and first["type"] == "finite_number"
    with pytest.raises(InputError) as e:  # through the upload's parser: 422, whichever layer refuses it first
        parse_config(json.dumps(_with(path, value)).encode())  # json.dumps writes NaN / Infinity, as Python reads them
    assert status_of(e.value) == 422


@pytest.mark.parametrize("seed", [SEED_LIMIT, 2**63, 2**64, 10**30, -1])
def test_a_seed_outside_0_to_2_53_is_refused(seed):
    with pytest.raises(ValidationError) as e:
        LadderConfig(seed=seed)
    assert e.value.errors()[0]["loc"] == ("seed",)
    with pytest.raises(InputError) as e:
        parse_config(json.dumps({"seed": seed}).encode())
    assert status_of(e.value) == 422


def test_the_largest_seed_and_every_seed_derived_from_it_seed_torch():
    cfg = parse_config(json.dumps({"seed": SEED_LIMIT - 1}).encode())  # admitted
    # the derivations of services/method: stage seeds, + 101 / + 202 in the evaluation, + k per attack
    derived = [stage_seed(cfg.seed, s) + extra for s in STAGES for extra in (0, 6, 101, 202)]
    for seed in [cfg.seed, *derived]:
        torch.Generator().manual_seed(seed)
        assert seed < 2**63


def test_ladder_harden_checks_the_same_bounds(tmp_path, capsys, monkeypatch):
    from services.cli import main

    (tmp_path / "spec.json").write_text('{"architecture": "lenet", "num_classes": 10, "input_shape": [1, 28, 28], '
                                        '"mean": [0.1307], "std": [0.3081]}')
    (tmp_path / "config.json").write_text('{"evaluate": {"attack": {"pgd_steps": 5000}}}')
    argv = ["harden", "--model", str(tmp_path / "absent.safetensors"), "--spec", str(tmp_path / "spec.json"),
            "--train", "mnist5k", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "ladder: error: config: evaluate.attack.pgd_steps = 5,000 is above the limit of 1,000; send at most 1,000 "
        "(an operator can raise the limit with LADDER_MAX_STEPS)")
    monkeypatch.setenv("LADDER_MAX_STEPS", "5000")
    get_settings.cache_clear()
    try:
        assert main(argv) == 2  # past the bounds: the next check (the weights) refuses
        assert "absent.safetensors not found" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
