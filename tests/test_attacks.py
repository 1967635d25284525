"""The pixel attacks: ours (FGSM, PGD, CW-L2) against ART's references on a trained LeNet, and the contract every
attack in the registry keeps through `craft` (mode restored, weights untouched, no parameter gradients, [0,1]
outputs, the L∞ budget, targets, seeds)."""

import numpy as np
import pytest
import torch

from services.method.attacks import (
    ATTACKS,
    art_classifier,
    attack_settings,
    craft,
    fgsm,
    jsma,
    pgd,
    pgd_steps,
)
from services.method.config import (
    AttackConfig,
    AutoAttackConfig,
    CWConfig,
    EvaluateConfig,
    JSMAConfig,
)
from services.method.cw import cw_l2
from services.method.finetune import fit
from services.method.models import ModelSpec, build_classifier

# the held-out digits are sorted by class: a fixed permutation gives every class
ORDER = torch.randperm(1000, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def points(lenet):
    """200 held-out digits, every class, and the LeNet's ART wrapper."""
    x, y = lenet.test.x[ORDER[:200]], lenet.test.y[ORDER[:200]]
    assert len(y.unique()) == 10
    return x, y, art_classifier(lenet.model, (1, 28, 28), 10)


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def robust_accuracy(model, x, y):
    return (predict(model, x) == y).float().mean().item()


# ---------------------------------------------------------------- FGSM and PGD against ART


def test_fgsm_matches_art(lenet, points):
    from art.attacks.evasion import FastGradientMethod

    x, y, clf = points
    ours = fgsm(lenet.model, x, y, None, AttackConfig(eps=0.3), torch.Generator())
    art = FastGradientMethod(clf, norm=np.inf, eps=0.3, batch_size=len(x)).generate(x.numpy(), y=y.numpy())
    art = torch.from_numpy(art)
    # deterministic: the same images (bit for bit here), up to the sign of a gradient entry that rounds differently
    assert (ours - art).abs().gt(1e-6).float().mean() < 1e-4
    assert abs(robust_accuracy(lenet.model, ours, y) - robust_accuracy(lenet.model, art, y)) <= 0.01
    assert robust_accuracy(lenet.model, ours, y) < 0.5 * robust_accuracy(lenet.model, x, y)


# Different random starts decide a few borderline points differently. On these 200 points our PGD's robust
# accuracy at ε = 0.1 moved by 0.5 point over 5 seeds (64.5–65 %) and ART's not at all over 3 (65 %); a
# 3-point tolerance (6 points) leaves room for other platforms yet fails for a step size or ε that is off.
PGD_TOLERANCE = 0.03


@pytest.mark.parametrize("eps,steps", [(0.3, 40), (0.1, 10)])
def test_pgd_matches_art(lenet, points, eps, steps):
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    x, y, clf = points
    cfg = AttackConfig(eps=eps, pgd_steps=steps)
    step = 2.5 * eps / steps
    ours = robust_accuracy(lenet.model, pgd(lenet.model, x, y, None, cfg, torch.Generator().manual_seed(0)), y)
    attack = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=step, max_iter=steps,
                                             num_random_init=1, batch_size=len(x), verbose=False)
    np.random.seed(0)  # ART draws its random start from numpy's global generator
    art = robust_accuracy(lenet.model, torch.from_numpy(attack.generate(x.numpy(), y=y.numpy())), y)
    assert abs(ours - art) <= PGD_TOLERANCE, (ours, art)
    if eps == 0.1:  # a comparison that can fail: neither attack wins everything at this budget
        assert 0.1 <= ours <= 0.9 and 0.1 <= art <= 0.9, (ours, art)
    else:
        assert ours <= 0.05


def test_pgd_seed_spread(lenet, points):
    """The tolerance above: our PGD's robust accuracy over random starts varies by well under 3 points."""
    x, y, _ = points
    cfg = AttackConfig(eps=0.1, pgd_steps=10)
    accs = [robust_accuracy(lenet.model, pgd(lenet.model, x, y, None, cfg, torch.Generator().manual_seed(s)), y)
            for s in range(3)]
    assert max(accs) - min(accs) <= 0.015, accs


@pytest.mark.parametrize("eps,steps", [(0.3, 40), (0.1, 10)])
def test_pgd_without_random_start_is_arts_pgd(lenet, points, eps, steps):
    """Without the random start PGD is deterministic: ours and ART's take the same steps to the same images.
    With early stopping (the evaluation's default) ours returns the first misclassified iterate of that same
    path: every point ART breaks, ours breaks, and the points it never stopped end where ART's do."""
    from art.attacks.evasion import ProjectedGradientDescentPyTorch

    x, y, clf = points
    cfg = AttackConfig(eps=eps, pgd_steps=steps, pgd_random_start=False, pgd_early_stop=False)
    ours = pgd(lenet.model, x, y, None, cfg, torch.Generator())
    attack = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=2.5 * eps / steps, max_iter=steps,
                                             num_random_init=0, batch_size=len(x), verbose=False)
    art = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    # the same images up to rounding (ART projects as x + clip(x_adv − x), and averages the loss where we sum it),
    # except where a rounded gradient entry near 0 flips sign and the path drifts: measured, 1 point of 200 at
    # ε = 0.3 (40 steps), none at ε = 0.1
    differ = (ours - art).abs().flatten(1).amax(1) > 1e-6
    assert differ.sum() <= 2, differ.sum()
    assert abs(robust_accuracy(lenet.model, ours, y) - robust_accuracy(lenet.model, art, y)) <= 0.01

    stopped = pgd(lenet.model, x, y, None, cfg.model_copy(update={"pgd_early_stop": True}), torch.Generator())
    broken, art_broken = predict(lenet.model, stopped) != y, predict(lenet.model, art) != y
    assert (art_broken & ~broken).sum() <= 1
    assert ((stopped - art).abs().flatten(1).amax(1) > 1e-6)[~broken].sum() <= 2


# ---------------------------------------------------------------- CW-L2 against ART


def cw_outcome(model, x, y, adv, target):
    """(success per point, L2 per point)."""
    pred = predict(model, adv)
    ok = pred != y if target is None else pred == target
    return ok, (adv - x).flatten(1).norm(dim=1)


@pytest.fixture(scope="module")
def cw_points(points):
    x, y, clf = points
    x, y = x[:20], y[:20]
    target = (y + torch.randint(1, 10, y.shape, generator=torch.Generator().manual_seed(1))) % 10
    return x, y, target, clf


# ART's CW takes ~20 passes through the model per step (a class gradient per label, a line search): small settings.
# Our Adam needs ≳ 5 / lr steps to move a pixel at 0 or 1 (|w| = 4.95), hence lr 0.1 for 50 steps.
CW_COMPARED = CWConfig(binary_search_steps=3, max_iter=50, lr=0.1, initial_const=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("targeted", [False, True])
def test_cw_matches_art(lenet, cw_points, targeted):
    from art.attacks.evasion import CarliniL2Method

    x, y, target, clf = cw_points
    t = target if targeted else None
    cfg = CW_COMPARED
    ours = cw_l2(lenet.model, x, y, cfg, torch.Generator(), t)
    attack = CarliniL2Method(clf, confidence=cfg.confidence, targeted=targeted, learning_rate=cfg.lr,
                             binary_search_steps=cfg.binary_search_steps, max_iter=cfg.max_iter,
                             initial_const=cfg.initial_const, batch_size=len(x), verbose=False)
    art = torch.from_numpy(attack.generate(x.numpy(), y=(target if targeted else y).numpy()))
    ok, l2 = cw_outcome(lenet.model, x, y, ours, t)
    art_ok, art_l2 = cw_outcome(lenet.model, x, y, art, t)
    assert ok.float().mean() >= art_ok.float().mean() - 0.05, (ok.float().mean(), art_ok.float().mean())
    both = ok & art_ok
    assert both.sum() >= 8  # a median over enough points (ART breaks 12–13 of the 20)
    # on the points both attacks break, ours finds perturbations as small as ART's (median within 25 %)
    assert l2[both].median() <= 1.25 * art_l2[both].median(), (l2[both].median(), art_l2[both].median())


@pytest.mark.parametrize("targeted", [False, True])
def test_cw_finds_small_valid_examples_and_returns_failures_unchanged(lenet, cw_points, targeted):
    x, y, target, _ = cw_points
    t = target if targeted else None
    adv = cw_l2(lenet.model, x, y, CWConfig(), torch.Generator(), t)
    ok, l2 = cw_outcome(lenet.model, x, y, adv, t)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1 and not adv.requires_grad
    assert ok.float().mean() >= 0.95  # unbounded in L2: (nearly) every point falls
    assert l2[ok].median() < (3.0 if targeted else 2.0)  # measured: 1.52 untargeted, 2.38 targeted
    assert torch.equal(adv[~ok], x[~ok])

    # one round at a tiny c barely moves: fewer successes, and every failure comes back as the original image
    weak = cw_l2(lenet.model, x, y, CWConfig(binary_search_steps=1, initial_const=1e-4), torch.Generator(), t)
    weak_ok, _ = cw_outcome(lenet.model, x, y, weak, t)
    assert weak_ok.float().mean() <= ok.float().mean() - 0.5
    assert torch.equal(weak[~weak_ok], x[~weak_ok])


def test_cw_confidence_reaches_the_margin(lenet, cw_points):
    x, y, target, _ = cw_points
    kappa = 5.0
    adv = cw_l2(lenet.model, x, y, CWConfig(confidence=kappa, binary_search_steps=4), torch.Generator(), target)
    with torch.no_grad():
        logits = lenet.model(adv)
    margin = logits.gather(1, target[:, None])[:, 0] - logits.scatter(1, target[:, None], float("-inf")).amax(1)
    ok = margin >= kappa - 1e-4
    assert ok.float().mean() >= 0.9
    assert torch.equal(adv[~ok], x[~ok])
    plain = cw_l2(lenet.model, x, y, CWConfig(binary_search_steps=4), torch.Generator(), target)
    both = ok & (predict(lenet.model, plain) == target)
    assert ((adv - x)[both].flatten(1).norm(dim=1) > (plain - x)[both].flatten(1).norm(dim=1)).float().mean() >= 0.9


# ---------------------------------------------------------------- the contract of every attack through craft

PROBE_SPEC = ModelSpec(architecture="svhnnet", num_classes=10, input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081])
EPS = 0.3  # AutoAttack's first attack (APGD-CE) then breaks every point and the others are skipped: ≈ 1 s
PROBE_CFG = EvaluateConfig(
    attack=AttackConfig(eps=EPS, pgd_steps=5),
    cw=CWConfig(max_samples=4, binary_search_steps=2, max_iter=50, lr=0.1, initial_const=1.0),
    jsma=JSMAConfig(max_samples=4),
    autoattack=AutoAttackConfig(max_samples=8),
    batch_size=8,
)


@pytest.fixture(scope="module")
def probe(lenet):
    """A net with batch norm and dropout (svhnnet), trained to ≈ 90 %: a forward pass in train mode would change
    its running statistics (a state_dict change), and its dropout would make the attack's gradients random."""
    torch.manual_seed(0)
    model = build_classifier(PROBE_SPEC)
    fit(model, lenet.train.x[::4], lenet.train.y[::4], epochs=2, lr=0.05, momentum=0.5, batch_size=64, seed=0)
    for p in model.parameters():
        p.grad = None
    pick = ORDER[:16]
    return model, lenet.test.x[pick], lenet.test.y[pick]


def modes(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_keeps_the_contract(probe, name, training):
    model, x, y = probe
    model.train(training)
    before_modes = modes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        out = craft(name, model, x, y, PROBE_CFG, seed=0, num_classes=10, warnings=[])
        assert modes(model) == before_modes  # every submodule's own mode, not just the top one
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and BN statistics
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()

    cap = getattr(attack_settings(name, PROBE_CFG), "max_samples", None) or len(x)
    assert torch.equal(out.point, torch.arange(cap))  # a prefix; one row per point (random targets)
    assert out.x.dtype == x.dtype and out.x.shape == (cap, *x.shape[1:]) and not out.x.requires_grad
    assert out.x.min() >= 0 and out.x.max() <= 1
    change = (out.x - x[out.point]).abs().flatten(1).amax(1)
    if name in ("fgsm", "pgd", "autoattack"):
        assert change.max() <= EPS + 1e-6
    assert change.max() > 1e-3  # the attack did move some point
    if ATTACKS[name].targeted:
        assert out.target is not None and len(out.target) == cap and (out.target != y[out.point]).all()
    else:
        assert out.target is None
    with torch.no_grad():
        pred = model(out.x).argmax(1)
    hit = pred != y[out.point] if out.target is None else pred == out.target
    assert hit.any() or name == "jsma"  # JSMA (γ = 0.1) breaks ≈ 40 % of this net's points, none of these 4


def test_jsma_is_arts_saliency_map_method(lenet, points):
    """The wrapper hands ART the targets (one-hot) and the settings: batched, it matches ART run point by point."""
    from art.attacks.evasion import SaliencyMapMethod

    x, y, clf = points
    x, y = x[:8], y[:8]
    target = (y + 1 + torch.arange(8) % 9) % 10
    ours = jsma(lenet.model, x, y, target, JSMAConfig(), torch.Generator())
    ref = SaliencyMapMethod(clf, theta=1.0, gamma=0.1, batch_size=1, verbose=False)
    ref = torch.from_numpy(ref.generate(x.numpy(), y=torch.nn.functional.one_hot(target, 10).numpy()))
    assert torch.equal(ours, ref)
    assert (predict(lenet.model, ours) == target).float().mean() >= 0.5


@pytest.mark.slow
def test_autoattack_keeps_the_contract_through_all_its_attacks(probe):
    """At ε = 0.1 some points survive APGD-CE, so APGD-T, FAB-T and Square run too (≈ 20 s)."""
    model, x, y = probe
    cfg = PROBE_CFG.model_copy(update={"attack": AttackConfig(eps=0.1), "autoattack": AutoAttackConfig(max_samples=4)})
    model.train()
    before_modes = modes(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        out = craft("autoattack", model, x, y, cfg, seed=0, num_classes=10, warnings=[])
        assert modes(model) == before_modes
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
    assert out.x.min() >= 0 and out.x.max() <= 1
    assert (out.x - x[:4]).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("name", ["cw", "jsma"])
def test_all_targets_are_expanded(probe, name):
    model, x, y = probe
    section = getattr(PROBE_CFG, name).model_copy(update={"targets": "all", "max_samples": 2})
    out = craft(name, model, x, y, PROBE_CFG.model_copy(update={name: section}), seed=0, num_classes=10)
    assert torch.equal(out.point, torch.arange(2).repeat_interleave(9))  # each point num_classes − 1 times
    assert len(out.x) == len(out.target) == 18
    for i in range(2):
        assert sorted(out.target[out.point == i].tolist()) == sorted(set(range(10)) - {int(y[i])})


def test_untargeted_cw_through_craft(probe):
    model, x, y = probe
    cfg = PROBE_CFG.model_copy(update={"cw": PROBE_CFG.cw.model_copy(update={"targeted": False})})
    out = craft("cw", model, x, y, cfg, seed=0, num_classes=10)
    assert out.target is None and torch.equal(out.point, torch.arange(4))
    with torch.no_grad():
        assert (model(out.x).argmax(1) != y[:4]).all()


def test_own_attacks_compute_input_gradients_only(probe):
    """Called directly (without craft's wrapper, which restores .grad after ART and AutoAttack), CW-L2 and PGD
    differentiate with respect to the input alone: no parameter gets a .grad."""
    model, x, y = probe
    assert all(p.grad is None for p in model.parameters())
    cw_l2(model, x[:4], y[:4], CWConfig(binary_search_steps=1, max_iter=3), torch.Generator(), None)
    cw_l2(model, x[:4], y[:4], CWConfig(binary_search_steps=1, max_iter=3), torch.Generator(), (y[:4] + 1) % 10)
    pgd_steps(model, x, y, 0.1, 2, None, True, torch.Generator())
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- seeds


def test_pgd_is_seeded(probe):
    """The random start comes from the seed alone, whatever the global generator's state."""
    model, x, y = probe
    torch.manual_seed(1)
    a = craft("pgd", model, x, y, PROBE_CFG, seed=3, num_classes=10).x
    torch.manual_seed(2)
    assert torch.equal(a, craft("pgd", model, x, y, PROBE_CFG, seed=3, num_classes=10).x)
    assert not torch.equal(a, craft("pgd", model, x, y, PROBE_CFG, seed=4, num_classes=10).x)


def test_autoattack_is_seeded(probe):
    model, x, y = probe
    torch.manual_seed(1)
    a = craft("autoattack", model, x, y, PROBE_CFG, seed=3, num_classes=10).x
    torch.manual_seed(2)
    assert torch.equal(a, craft("autoattack", model, x, y, PROBE_CFG, seed=3, num_classes=10).x)
