"""Each stage on real digits: boundary, calibration, generator, generation, fine-tuning, attacks."""

import pytest
import torch

from services.method.attacks import craft, fgsm, pgd
from services.method.boundary import fit_boundary
from services.method.config import AttackConfig, BoundaryConfig, EvaluateConfig, GeneratorConfig
from services.method.finetune import accuracy, fit
from services.method.generator import fidelity, train_generator
from services.method.perturb import calibrate, directions, generate, random_targets


@pytest.fixture(scope="module")
def boundary(lenet, latents):
    _, z = latents
    return fit_boundary(z, lenet.train.y, 10, BoundaryConfig(samples_per_class=150, holdout_per_class=50, attention_steps=10), seed=0)


# mnist5k is sorted by class: tests take permuted or strided subsets so that every class appears
PICK = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:1000]


@pytest.fixture(scope="module")
def crossing(lenet, latents, boundary):
    split, z = latents
    gen = torch.Generator().manual_seed(1)
    y = lenet.train.y[PICK]
    assert len(y.unique()) == 10
    t = random_targets(y, 10, gen)
    step = directions(boundary, z[PICK], y, t, "boundary", gen)
    return y, t, step, calibrate(split.head, z[PICK], step, t, [0.1, 0.25, 0.5, 0.75, 0.9])


def test_svm_separates_every_pair_on_held_out_latents(boundary):
    assert boundary.pairs.shape == (45, 2)
    assert boundary.fit["newton_converged"]
    assert boundary.holdout_accuracy.min() >= 0.9, boundary.holdout_accuracy
    assert boundary.holdout_accuracy.mean() >= 0.97


def test_attention_has_mean_one(boundary, latents):
    _, z = latents
    index = torch.arange(45).repeat_interleave(4)
    beta = boundary.attention(z[PICK[: len(index)]], index)
    torch.testing.assert_close(beta.mean(1), torch.ones(len(index)))
    assert beta.std() > 0  # attention is not constant


def test_pair_index_and_orientation(boundary):
    s, t = torch.tensor([3, 7, 0]), torch.tensor([7, 3, 9])
    index, sign = boundary.pair_index(s, t)
    assert boundary.pairs[index].tolist() == [[3, 7], [3, 7], [0, 9]]
    assert sign.tolist() == [1.0, -1.0, 1.0]


def test_normal_points_from_source_to_target(latents, crossing):
    split, z = latents
    y, t, step, cal = crossing
    with torch.no_grad():
        moved = split.head(z[PICK] + cal.eps[-1] * step).argmax(1)
        backwards = split.head(z[PICK] - cal.eps[-1] * step).argmax(1)
    assert (moved == t).float().mean() >= 0.8
    assert (backwards == t).float().mean() <= 0.1


def test_calibration_is_monotone_and_hits_its_quantiles(crossing):
    *_, cal = crossing
    assert cal.eps == sorted(cal.eps) and len(set(cal.eps)) == len(cal.eps)
    assert all(b >= a - 0.02 for a, b in zip(cal.crossing_rate, cal.crossing_rate[1:]))
    for q, rate in zip(cal.quantiles, cal.crossing_rate):
        assert abs(rate - q) <= 0.1, (q, rate)


def test_raw_eps_list_is_measured_not_changed(latents, crossing):
    split, z = latents
    y, t, step, _ = crossing
    cal = calibrate(split.head, z[PICK], step, t, None, [0.5, 25.0])
    assert cal.eps == [0.5, 25.0] and cal.quantiles is None
    assert cal.crossing_rate[0] < cal.crossing_rate[1]


@pytest.fixture(scope="module")
def generator_fit(latents, lenet):
    _, z = latents
    return train_generator(z, lenet.train.x, GeneratorConfig(max_epochs=6, time_budget_s=60), seed=0)


def test_generator_reconstructs_held_out_images(generator_fit, latents, lenet):
    _, z = latents
    hold = generator_fit.holdout_index
    g = generator_fit.build()
    f = fidelity(g, lenet.model, z[hold], lenet.train.x[hold], lenet.train.y[hold], lenet.train.x)
    assert f["reconstruction_mse"] < 0.4 * f["mean_image_mse"], f
    assert f["reconstruction_accuracy"] >= f["clean_accuracy"] - 0.15, f


def test_generation_labels_with_the_source_class_at_every_eps(generator_fit, latents, lenet, crossing):
    _, z = latents
    y, t, step, cal = crossing
    adv = generate(generator_fit.build(), lenet.model, z[PICK], y, t, step, cal.eps, batch_size=256)
    assert adv.x.shape == (1000 * len(cal.eps), 1, 28, 28)
    assert adv.x.min() >= 0 and adv.x.max() <= 1
    assert torch.equal(adv.y, y.repeat(len(cal.eps))) and torch.equal(adv.target, t.repeat(len(cal.eps)))
    assert adv.image_flip_rate[-1] > adv.image_flip_rate[0]  # larger ε → more images cross


def test_variant_directions(boundary, latents, lenet):
    _, z = latents
    y = lenet.train.y[PICK[:200]]
    t = random_targets(y, 10, torch.Generator().manual_seed(0))
    d = directions(boundary, z[PICK[:200]], y, t, "boundary", torch.Generator())
    r = directions(boundary, z[PICK[:200]], y, t, "random", torch.Generator().manual_seed(0))
    c = directions(boundary, z[PICK[:200]], y, t, "cav_random", torch.Generator().manual_seed(0), cav_noise=0.01)
    cos = torch.nn.functional.cosine_similarity
    assert cos(d, c).min() > 0.8  # boundary + small noise
    assert cos(d, r).abs().mean() < 0.2  # unrelated to the boundary
    torch.testing.assert_close(r.norm(dim=1), d.norm(dim=1))  # the ablation changes the direction, not the size
    assert (t != y).all()


def test_ladder_blends_a_random_direction_by_its_share(boundary, latents, lenet):
    _, z = latents
    y = lenet.train.y[PICK[:200]]
    t = random_targets(y, 10, torch.Generator().manual_seed(0))
    d = directions(boundary, z[PICK[:200]], y, t, "boundary", torch.Generator())
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert torch.equal(directions(boundary, z[PICK[:200]], y, t, "boundary", gen, random_share=0.0), d)
    assert torch.equal(gen.get_state(), state)  # share 0: the paper's normal, and no random numbers drawn
    cos = torch.nn.functional.cosine_similarity
    half = directions(boundary, z[PICK[:200]], y, t, "boundary", torch.Generator().manual_seed(3), random_share=0.5)
    r = directions(boundary, z[PICK[:200]], y, t, "random", torch.Generator().manual_seed(3))
    torch.testing.assert_close(half, 0.5**0.5 * (d + r))  # the same draw as the random direction's
    assert (cos(half, d) - 0.5**0.5).abs().mean() < 0.1  # 45° from the normal, as long as the normal step
    torch.testing.assert_close(half.norm(dim=1) / d.norm(dim=1), torch.ones(len(d)), atol=0.25, rtol=0)
    full = directions(boundary, z[PICK[:200]], y, t, "boundary", torch.Generator().manual_seed(3), random_share=1.0)
    torch.testing.assert_close(full, r)  # share 1: LADDER_Random


@pytest.mark.parametrize("attack", [fgsm, pgd])
def test_attacks_respect_eps_and_range_and_restore_mode(lenet, attack):
    x, y = lenet.test.x[::16], lenet.test.y[::16]
    cfg = AttackConfig(eps=0.1, pgd_steps=5)
    before = {k: v.clone() for k, v in lenet.model.state_dict().items()}
    lenet.model.train()
    adv = attack(lenet.model, x, y, None, cfg, torch.Generator().manual_seed(0))
    assert lenet.model.training
    lenet.model.eval()
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert all(torch.equal(before[k], v) for k, v in lenet.model.state_dict().items())
    assert accuracy(lenet.model, adv, y) < accuracy(lenet.model, x, y)


def test_pgd_is_at_least_as_strong_as_fgsm_and_seeded(lenet):
    x, y = lenet.test.x[::5], lenet.test.y[::5]
    cfg = EvaluateConfig(attack=AttackConfig(eps=0.2, pgd_steps=10))
    a = craft("pgd", lenet.model, x, y, cfg, 3, 10).x
    assert torch.equal(a, craft("pgd", lenet.model, x, y, cfg, 3, 10).x)
    assert accuracy(lenet.model, a, y) <= accuracy(lenet.model, craft("fgsm", lenet.model, x, y, cfg, 3, 10).x, y)


def test_fit_with_alpha_one_ignores_extra_and_is_seeded(lenet):
    import copy

    x, y = lenet.train.x[::16], lenet.train.y[::16]
    a, b, c = (copy.deepcopy(lenet.model) for _ in range(3))
    fit(a, x, y, epochs=1, lr=0.01, momentum=0.5, batch_size=64, seed=5)
    fit(b, x, y, epochs=1, lr=0.01, momentum=0.5, batch_size=64, seed=5, extra=(torch.rand_like(x), y))
    fit(c, x, y, epochs=1, lr=0.01, momentum=0.5, batch_size=64, seed=5, alpha=0.5, extra=(torch.rand_like(x), y))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    with pytest.raises(ValueError, match="exactly one source"):
        fit(a, x, y, epochs=1, lr=0.01, momentum=0.5, batch_size=64, seed=5, alpha=0.5)


def test_fit_cosine_schedule_steps_the_learning_rate_down_to_zero():
    """With momentum 0, each step of `fit` is w ← w − lr_k·∇: replay it by hand with lr_k = lr·½(1 + cos(πk/K))."""
    import copy
    import math

    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 2, 2, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    tuned, by_hand, flat = (copy.deepcopy(model) for _ in range(3))
    fit(tuned, x, y, epochs=2, lr=0.5, momentum=0.0, batch_size=8, seed=3, schedule="cosine")
    fit(flat, x, y, epochs=2, lr=0.5, momentum=0.0, batch_size=8, seed=3)
    order_gen, k = torch.Generator().manual_seed(3), 0
    for _ in range(2):
        order = torch.randperm(32, generator=order_gen)
        for i in range(4):
            idx = order[i * 8 : (i + 1) * 8]
            by_hand.zero_grad()
            F.cross_entropy(by_hand(x[idx]), y[idx]).backward()
            with torch.no_grad():
                for p in by_hand.parameters():
                    p -= 0.5 * 0.5 * (1 + math.cos(math.pi * k / 8)) * p.grad
            k += 1
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(tuned.parameters(), by_hand.parameters()))
    assert not all(torch.allclose(p, q, atol=1e-4) for p, q in zip(tuned.parameters(), flat.parameters()))
    with pytest.raises(ValueError, match="schedule must be one of"):
        fit(tuned, x, y, epochs=1, lr=0.5, momentum=0.0, batch_size=8, seed=3, schedule="step")
