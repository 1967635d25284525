"""The evaluation's bookkeeping: average rank, per-point worst case, target expansion, baselines' training."""

import pytest
import torch
from pydantic import ValidationError

from services.method.attacks import expand_targets
from services.method.config import ATTACK_NAMES, EvaluateConfig
from services.method.data import balanced_order
from services.method.evaluate import Examples, evaluate, per_point, worst_case
from services.method.finetune import fit
from services.method.rank import average_rank, column_ranks, report_ranks

# The paper's Table 2 (MNIST, LeNet, black-box), the rows method.md quotes; "–" cells are the attack trained on.
TABLE2 = {
    "vanilla": {"clean": 99.13, "fgsm": 46.6, "jsma": 93.91, "pgd": 29.93, "cw": 99.09, "song": 99.82, "autoattack": 99.56},
    "fgsm_at": {"clean": 92.31, "fgsm": None, "jsma": 83.67, "pgd": 80.91, "cw": 90.58, "song": 95.53, "autoattack": 92.22},
    "pgd_at": {"clean": 90.79, "fgsm": 76.2, "jsma": 83.31, "pgd": None, "cw": 90.67, "song": 94.44, "autoattack": 90.36},
    "trades": {"clean": 98.44, "fgsm": 60.8, "jsma": 92.6, "pgd": 52.31, "cw": 98.4, "song": 99.8, "autoattack": 98.71},
    "ladder": {"clean": 99.12, "fgsm": 55.8, "jsma": 93.13, "pgd": 49.2, "cw": 98.9, "song": 99.82, "autoattack": 99.36},
    "trades_ladder": {"clean": 98.94, "fgsm": 54.8, "jsma": 93.36, "pgd": 52.04, "cw": 98.78, "song": 99.82, "autoattack": 99.78},
}
# Ranked by hand (1 = best; the three 99.82 in the Song column share rank 2):
#            clean fgsm jsma pgd cw song aa   mean
# vanilla      1    5    1    5   1   2   2   17/7
# fgsm_at      5    –    5    1   6   5   5   27/6
# pgd_at       6    1    6    –   5   6   6   30/6
# trades       4    2    4    2   4   4   4   24/7
# ladder       2    3    3    4   2   2   3   19/7
# trades_l.    3    4    2    3   3   2   1   18/7
BY_HAND = {"vanilla": 17 / 7, "fgsm_at": 27 / 6, "pgd_at": 30 / 6, "trades": 24 / 7, "ladder": 19 / 7, "trades_ladder": 18 / 7}


def test_average_rank_matches_the_hand_computed_table2_example():
    trained_on = {"fgsm_at": "fgsm", "pgd_at": "pgd"}
    ranks = average_rank(TABLE2, trained_on)
    assert ranks == pytest.approx(BY_HAND)
    # the trained-on cell is skipped even when it has a value: filling it in changes nothing
    filled = {m: dict(row) for m, row in TABLE2.items()}
    filled["fgsm_at"]["fgsm"], filled["pgd_at"]["pgd"] = 100.0, 100.0
    assert average_rank(filled, trained_on) == pytest.approx(BY_HAND)
    # ... and counting it would change the ranks
    assert average_rank(filled) != pytest.approx(BY_HAND)


def test_ties_share_the_mean_rank_and_missing_values_are_left_out():
    assert column_ranks({"a": 0.9, "b": 0.9, "c": 0.5, "d": None}) == {"a": 1.5, "b": 1.5, "c": 3.0}
    assert average_rank({"a": {"x": None}, "b": {"x": 0.1}}) == {"a": None, "b": 1.0}


def test_report_ranks_use_clean_and_the_settings_attacks():
    def model(clean, fgsm, pgd, trained_on=None):
        return {"clean_accuracy": clean, "trained_on": trained_on,
                "attacks": {"blackbox": {"fgsm": {"accuracy": fgsm}, "pgd": {"accuracy": pgd}}}}

    models = {"vanilla": model(0.99, 0.4, 0.3), "pgd_at": model(0.9, 0.8, 0.9, "pgd"), "ladder": model(0.98, 0.5, 0.5)}
    ranks = report_ranks(models, ["blackbox"])["blackbox"]
    assert ranks == pytest.approx({"vanilla": (1 + 3 + 2) / 3, "pgd_at": (3 + 1) / 2, "ladder": (2 + 2 + 1) / 3})


def test_per_point_needs_every_row_of_a_point_correct():
    point = torch.tensor([0, 1, 2, 0, 1, 2])
    correct = torch.tensor([True, True, False, True, False, False])
    assert per_point(correct, point, 3).tolist() == [True, False, False]


def test_worst_case_is_over_the_common_prefix_and_includes_clean():
    clean = torch.tensor([True, True, True, False, True])
    robust = {"fgsm": torch.tensor([True, False, True, True, True]), "jsma": torch.tensor([True, True, True])}
    assert worst_case(clean, robust) == {"accuracy": pytest.approx(2 / 3), "n": 3, "attacks": ["fgsm", "jsma"]}


def test_targets_random_differ_from_labels_and_all_covers_every_other_class():
    y = torch.tensor([0, 3, 9, 9])
    gen = torch.Generator().manual_seed(0)
    rows, t = expand_targets(y, 10, "random", gen)
    assert rows.tolist() == [0, 1, 2, 3] and (t != y).all() and ((0 <= t) & (t < 10)).all()
    rows, t = expand_targets(y, 10, "all", gen)
    assert len(rows) == 36 and (t != y[rows]).all()
    for i in range(4):
        assert sorted(t[rows == i].tolist()) == [c for c in range(10) if c != y[i]]


def test_balanced_order_deals_the_classes_out_so_every_prefix_is_balanced():
    y = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    order = balanced_order(y, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(len(y)))
    for k in range(1, 4):  # while every class has samples left, a prefix of 3k holds k of each
        assert torch.bincount(y[order[: 3 * k]], minlength=3).tolist() == [k, k, k]
    assert torch.bincount(y[order[:13]], minlength=3).tolist() == [5, 5, 3]
    other = balanced_order(y, torch.Generator().manual_seed(1))
    assert not torch.equal(order, other)  # random within the rounds


def test_whitebox_attacks_narrows_the_whitebox_runs_only():
    cfg = EvaluateConfig(whitebox_attacks=["ladder"])
    assert cfg.runs("whitebox") == ["ladder"]
    assert cfg.runs("blackbox") == ["fgsm", "pgd", "cw", "jsma", "autoattack"]  # the LADDER attack is never transferred
    assert EvaluateConfig().runs("whitebox") == list(ATTACK_NAMES)
    assert EvaluateConfig(settings=["whitebox"]).runs("blackbox") == []
    with pytest.raises(ValidationError, match="subset of attacks"):
        EvaluateConfig(attacks=["fgsm"], whitebox_attacks=["pgd"])


def test_evaluate_runs_each_setting_its_own_attacks(lenet):
    x, y = lenet.test.x[:40], lenet.test.y[:40]
    cfg = EvaluateConfig(attacks=["fgsm", "pgd"], whitebox_attacks=["fgsm"], attack={"pgd_steps": 2})
    out = evaluate({"vanilla": lenet.model}, lenet.model, x, y, cfg, seed=0, num_classes=10)
    attacks = out["models"]["vanilla"]["attacks"]
    assert set(attacks["whitebox"]) == {"fgsm"} and set(attacks["blackbox"]) == {"fgsm", "pgd"}
    assert out["evaluation"]["runs"] == {"whitebox": ["fgsm"], "blackbox": ["fgsm", "pgd"]}
    # the same surrogate as the model: transfer FGSM is the white-box FGSM with the same seed
    assert attacks["whitebox"]["fgsm"]["accuracy"] == attacks["blackbox"]["fgsm"]["accuracy"]


def test_a_point_misclassified_clean_is_not_robust_whatever_its_attacked_rows_score(lenet):
    m, x, y = lenet.model, lenet.test.x, lenet.test.y
    with torch.no_grad():
        pred = m(x).argmax(1)
    w = int((pred != y).nonzero()[0])  # misclassified clean
    r = int((pred == y).nonzero()[0])  # classified right
    j = int((pred == y[w]).nonzero()[0])  # an image the model labels as point w's true class
    points_x, points_y = x[[w, r]], y[[w, r]]
    rows = Examples(torch.stack([x[j], x[r]]), torch.tensor([0, 1]), {"eps": [1.0]})
    cfg = EvaluateConfig(attacks=["ladder"], settings=["whitebox"])
    out = evaluate({"m": m}, None, points_x, points_y, cfg, seed=0, num_classes=10, ladder=rows)
    entry = out["models"]["m"]["attacks"]["whitebox"]["ladder"]
    assert entry["accuracy"] == 0.5 and entry["n"] == 2  # w's attacked row is "correct", but w was never robust
    assert out["models"]["m"]["clean_accuracy"] == 0.5


@pytest.mark.parametrize("kind", ["fgsm_at", "pgd_at", "trades", "trades_ladder"])
def test_the_baselines_losses_match_their_definitions_on_one_batch(kind):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    extra = (torch.rand(1, 1, 2, 2).repeat(8, 1, 1, 1), torch.full((8,), 2))  # every draw the same row
    craft = lambda m, xb, yb: 1 - xb  # noqa: E731  (a stand-in attack, a function of the batch)
    beta, alpha = 6.0, 0.5
    with torch.no_grad():
        clean, adv = model(x), model(1 - x)
        p, q = clean.softmax(1), adv.softmax(1)
        kl = (p * (p.log() - q.log())).sum(1).mean()
        ce = torch.nn.functional.cross_entropy
        expected = {
            "fgsm_at": alpha * ce(clean, y) + (1 - alpha) * ce(adv, y),  # Goodfellow et al.
            "pgd_at": ce(adv, y),  # Madry et al.: the adversarial loss only
            "trades": ce(clean, y) + beta * kl,  # Zhang et al.: KL(f(x) ‖ f(x'))
            "trades_ladder": alpha * (ce(clean, y) + beta * kl) + (1 - alpha) * ce(model(extra[0]), extra[1]),
        }[kind]
    how = {"fgsm_at": {"alpha": alpha, "craft": craft}, "pgd_at": {"alpha": 0.0, "craft": craft},
           "trades": {"alpha": 1.0, "trades": (beta, craft)},
           "trades_ladder": {"alpha": alpha, "extra": extra, "trades": (beta, craft)}}[kind]
    loss = fit(model, x, y, epochs=1, lr=0.1, momentum=0.0, batch_size=8, seed=0, **how)
    assert loss[0] == pytest.approx(expected.item(), rel=1e-5)  # one step: the loss before its update
