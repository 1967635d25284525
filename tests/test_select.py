"""Checkpoint selection within a clean-accuracy budget (services/method/select.py): the rule, and whole runs."""

import random

import pytest
import torch

from services.method.data import ImageData
from services.method.harden import harden
from services.method.models import build_classifier, net_weights
from services.method.pipeline import MemoryStore, Run
from services.method.report import build_report
from services.method.select import Selector, score
from services.report import page

from .conftest import quick_config

WEIGHTS = {"w": torch.zeros(1)}


def _selector(budget: float, clean: float = 0.9, objective: float = 0.2) -> Selector:
    return Selector({"clean": clean, "objective": objective}, WEIGHTS, budget)


@pytest.mark.parametrize("seed", range(20))
def test_the_choice_is_the_best_objective_within_the_budget_and_never_beyond_it(seed):
    rnd = random.Random(seed)
    budget = rnd.choice([0.0, 0.1, 0.3, 1.0])
    sel = _selector(budget)
    epochs = [{"clean": round(0.9 + rnd.uniform(-0.02, 0.01), 4), "objective": rnd.uniform(0, 0.6)} for _ in range(8)]
    for k, s in enumerate(epochs, 1):
        sel.offer(k, s, lambda k=k: {"w": torch.full((1,), float(k))})
    out = sel.summary()
    feasible = [(s["objective"], s["clean"], -k) for k, s in enumerate(epochs, 1) if 100 * (0.9 - s["clean"]) <= budget + 1e-9]
    best = max([(0.2, 0.9, 0), *feasible])  # the uploaded model is epoch 0
    assert out["chosen_epoch"] == -best[2]
    assert 100 * (0.9 - out["validation"]["clean"]) <= budget + 1e-9
    assert float(sel.weights["w"]) == out["chosen_epoch"]  # the weights are the chosen epoch's
    assert [c["epoch"] for c in out["curve"]] == list(range(9))
    assert [c["within_budget"] for c in out["curve"][1:]] == [100 * (0.9 - s["clean"]) <= budget + 1e-9 for s in epochs]


def test_a_zero_budget_and_every_epoch_worse_returns_the_uploaded_weights_and_says_why():
    sel = _selector(0.0)
    for k in range(1, 4):
        sel.offer(k, {"clean": 0.9 - 0.01 * k, "objective": 0.9}, lambda: pytest.fail("a worse epoch's weights were copied"))
    out = sel.summary()
    assert out["chosen_epoch"] == 0 and out["uploaded_weights"] and sel.weights is WEIGHTS
    assert "no checkpoint kept the validation clean drop within the budget" in out["why"]
    equal = _selector(0.0)
    equal.offer(1, {"clean": 0.9, "objective": 0.2}, lambda: pytest.fail("a tie with the uploaded model was copied"))
    assert equal.summary()["chosen_epoch"] == 0 and "beat the uploaded model" in equal.summary()["why"]


def _marked(data: ImageData) -> ImageData:
    """The same images, each with a unique top-left pixel: its row number, so that rows can be told apart."""
    x = data.x.clone()
    x[:, 0, 0, 0] = torch.arange(len(x)) / len(x)
    return ImageData(x, data.y)


def _ids(x: torch.Tensor, n: int) -> set[int]:
    return set((x[:, 0, 0, 0] * n).round().long().tolist())


def test_the_validation_split_is_apart_from_fine_tuning_and_test_data(lenet, monkeypatch):
    import services.method.pipeline as pipeline

    train, test = _marked(lenet.train), _marked(lenet.test)
    run = Run(lenet.model, lenet.spec, train, test, quick_config(select={"max_clean_drop": 0.3}))
    seen, real_fit = [], pipeline.fit

    def spy(model, x, y, **kw):
        seen.append(x)
        return real_fit(model, x, y, **kw)

    monkeypatch.setattr(pipeline, "fit", spy)
    run.output("finetune")
    n = len(train)
    val = _ids(run.val.x, n)
    assert len(val) == len(run.val) == round(0.1 * n) and _ids(run.train.x, n) | val == set(range(n))
    assert seen and all(not (_ids(x, n) & val) for x in seen)  # surrogate, control, LADDER: never a validation row
    assert len(run.output("latents")) == len(run.train)  # the boundary and the generator learn from the rest only
    assert torch.equal(run.test.x, test.x)  # the test split is the one given, untouched
    assert set(torch.bincount(run.val.y).tolist()) == {round(0.1 * c) for c in torch.bincount(train.y).tolist()}


def test_given_validation_data_is_the_split_and_train_is_left_whole(lenet):
    train, test = _marked(lenet.train), _marked(lenet.test)
    val = ImageData(test.x[::10], test.y[::10])  # any labelled rows of every class
    run = Run(lenet.model, lenet.spec, train, test, quick_config(select={"max_clean_drop": 0.3}), validation=val)
    assert run.val is val and torch.equal(run.train.x, train.x)  # the report's source: test_service.py


def test_validation_data_without_a_budget_or_short_of_a_class_is_refused(lenet):
    from services.errors import InputError

    val = ImageData(lenet.test.x[::10], lenet.test.y[::10])
    with pytest.raises(InputError, match="select.max_clean_drop"):
        Run(lenet.model, lenet.spec, lenet.train, lenet.test, quick_config(), validation=val)
    one = lenet.test.y != 3
    with pytest.raises(InputError, match="validation data has 0 samples of class 3"):
        Run(lenet.model, lenet.spec, lenet.train, lenet.test, quick_config(select={"max_clean_drop": 0.3}),
            validation=ImageData(lenet.test.x[one], lenet.test.y[one]))


@pytest.fixture(scope="module")
def ruined(lenet):
    """A job whose fine-tuning ruins the model every epoch (lr 20), with a zero budget."""
    cfg = quick_config(select={"max_clean_drop": 0.0}, finetune={"epochs": 2, "lr": 20.0})
    store = MemoryStore()
    return harden(lenet.model, lenet.spec, lenet.train, lenet.test, cfg, store), store


def test_a_job_that_every_epoch_makes_worse_returns_the_uploaded_weights_and_says_so(ruined, lenet):
    result, _ = ruined
    sel = result.report["selection"]
    for name in ("control", "ladder"):
        chosen = sel["models"][name]
        assert chosen["chosen_epoch"] == 0 and chosen["uploaded_weights"], name
        assert chosen["why"].startswith("the uploaded weights"), name
        assert all(not c["within_budget"] for c in chosen["curve"][1:]), name  # it did get worse
        for k, v in net_weights(lenet.model).items():
            assert torch.equal(net_weights(result.models[name])[k], v), (name, k)
        assert result.report["models"][name]["clean_accuracy"] == result.report["models"]["vanilla"]["clean_accuracy"]
    assert sel["budget_held_on_test"] and sel["max_clean_drop_points"] == 0.0
    assert sel["validation"]["source"] == "carved" and sel["validation"]["fraction"] == 0.1


def test_the_chosen_weights_are_the_ones_scored_and_evaluated(lenet):
    cfg = quick_config(select={"max_clean_drop": 1.0}, finetune={"epochs": 3})
    run = Run(lenet.model, lenet.spec, lenet.train, lenet.test, cfg)
    report = build_report(run)
    tuned = run.output("finetune")
    from services.method.pipeline import train_surrogate
    from services.method.select import make_proxy
    from services.method.stages import validation_seed

    surrogate, _ = train_surrogate(lenet.spec, run.train, cfg)
    proxy = make_proxy(surrogate, run.val, cfg.select, run.cfg.evaluate, validation_seed(cfg.seed), 10)
    for name, chosen in report["selection"]["models"].items():
        model = build_classifier(lenet.spec, tuned.weights[name])
        assert score(model, proxy, cfg.select.objective, 500) == chosen["validation"], name  # the stored weights were scored
        within = [c for c in chosen["curve"] if c["within_budget"]]
        assert chosen["validation"]["objective"] == max(c["objective"] for c in within), name
        for k, v in net_weights(run.models()[name]).items():  # and the evaluated model is built from them
            assert torch.equal(v, tuned.weights[name][k])
    assert set(report["selection"]["on_test"]) == {"control", "ladder"}
    drop = 100 * (report["models"]["vanilla"]["clean_accuracy"] - report["models"]["ladder"]["clean_accuracy"])
    assert report["selection"]["on_test"]["ladder"]["clean_drop_points"] == pytest.approx(drop)


def test_checks_within_an_epoch_are_evenly_spaced_and_leave_the_training_as_it_was(lenet):
    from services.method.finetune import fit

    x, y = lenet.train.x[:640], lenet.train.y[:640]  # 10 steps an epoch
    kw = dict(epochs=2, lr=0.01, momentum=0.5, batch_size=64, seed=3)
    seen, modes = [], []

    def check(position, model):
        seen.append(position)
        modes.append(model.training)

    plain, checked = build_classifier(lenet.spec, net_weights(lenet.model)), build_classifier(lenet.spec, net_weights(lenet.model))
    fit(plain, x, y, **kw)
    fit(checked, x, y, **kw, on_check=check, checks_per_epoch=4)
    assert seen == [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2] and not any(modes)  # scored in eval mode
    for k, v in net_weights(plain).items():
        assert torch.equal(v, net_weights(checked)[k]), k
    seen.clear()
    fit(build_classifier(lenet.spec), x[:64], y[:64], **kw, on_check=check, checks_per_epoch=4)  # one step an epoch
    assert seen == [1, 2]


def _ranked(budget: float) -> Selector:
    return Selector({"clean": 0.9, "transfer_pgd": 0.2, "transfer_fgsm": 0.4, "objective": None}, WEIGHTS, budget)


@pytest.mark.parametrize("seed", range(10))
def test_the_rank_objective_chooses_the_lowest_average_rank_among_the_feasible_checkpoints(seed):
    from services.method.rank import average_rank

    rnd = random.Random(seed)
    sel = _ranked(0.5)
    scores = [{"clean": round(0.9 + rnd.uniform(-0.01, 0.005), 3), "transfer_pgd": round(rnd.uniform(0, 0.5), 2),
               "transfer_fgsm": round(rnd.uniform(0.2, 0.6), 2), "objective": None} for _ in range(12)]
    copied = []
    for k, s in enumerate(scores, 1):
        sel.offer(k / 4, s, lambda k=k: copied.append(k) or {"w": torch.full((1,), k / 4)})
    out = sel.summary()
    feasible = [(0, {"clean": 0.9, "transfer_pgd": 0.2, "transfer_fgsm": 0.4})] + [
        (k / 4, s) for k, s in enumerate(scores, 1) if 100 * (0.9 - s["clean"]) <= 0.5 + 1e-9]
    ranks = average_rank({e: {c: s[c] for c in ("clean", "transfer_pgd", "transfer_fgsm")} for e, s in feasible})
    best = min(feasible, key=lambda f: (ranks[f[0]], -f[1]["clean"], f[0]))[0]
    assert out["chosen_epoch"] == best and float(sel.weights["w"] if best else 0) == best
    assert out["validation"]["objective"] == ranks[best]
    assert [c["objective"] for c in out["curve"] if c["within_budget"]] == list(ranks.values())
    assert all(c["objective"] is None for c in out["curve"] if not c["within_budget"])
    assert len(copied) < len(scores) or len(feasible) == len(scores) + 1  # a dominated checkpoint is not copied


def test_rank_keeps_the_uploaded_weights_when_no_checkpoint_beats_them():
    sel = _ranked(0.1)
    sel.offer(1, {"clean": 0.9, "transfer_pgd": 0.2, "transfer_fgsm": 0.4, "objective": None}, lambda: pytest.fail("a tie was copied"))
    sel.offer(2, {"clean": 0.899, "transfer_pgd": 0.19, "transfer_fgsm": 0.4, "objective": None},
              lambda: pytest.fail("a dominated one was copied"))
    sel.offer(3, {"clean": 0.5, "transfer_pgd": 0.9, "transfer_fgsm": 0.9, "objective": None}, lambda: pytest.fail("beyond the budget"))
    out = sel.summary()
    assert out["uploaded_weights"] and sel.weights is WEIGHTS and "average rank" in out["why"]


@pytest.mark.parametrize("objective", ["transfer_autoattack", "rank"])
def test_a_job_selects_by_transfer_autoattack_and_by_rank(lenet, objective):
    cfg = quick_config(select={"max_clean_drop": 1.0, "objective": objective, "robust_points": 50}, finetune={"epochs": 1})
    result = harden(lenet.model, lenet.spec, lenet.train, lenet.test, cfg)
    sel = result.report["selection"]
    for name, chosen in sel["models"].items():
        assert "transfer_autoattack" in chosen["validation"], name
        feasible = [c for c in chosen["curve"] if c["within_budget"]]
        if objective == "rank":
            assert chosen["validation"]["objective"] == min(c["objective"] for c in feasible), name
        else:
            assert chosen["validation"]["objective"] == max(c["objective"] for c in feasible), name
    assert "Checkpoint selection" in (page(result.report, result.gallery) or "")
