"""The zoo, the wrapper and the latent split h ∘ Φ."""

import pytest
import torch

from services.errors import InputError
from services.method.models import ModelSpec, build_classifier, load_net_weights, net_weights, prepare


@pytest.mark.parametrize(
    ("architecture", "shape", "dim"),
    [("lenet", (1, 28, 28), 500), ("smallcnn", (1, 28, 28), 128), ("svhnnet", (3, 32, 32), 256),
     ("resnet18", (1, 28, 28), 512), ("mobilenet_v3_small", (3, 32, 32), 1024)],
)
def test_head_of_latents_reproduces_logits(architecture, shape, dim):
    spec = ModelSpec(architecture=architecture, num_classes=7, input_shape=shape, mean=[0.5], std=[0.25])
    torch.manual_seed(0)
    model = build_classifier(spec)
    split = prepare(model, spec)
    x = torch.rand(5, *shape)
    with torch.no_grad():
        z = split.features(x)
        assert z.shape == (5, dim)
        torch.testing.assert_close(split.head(z), model(x), atol=1e-4, rtol=1e-4)


def test_latent_split_shares_parameters_with_the_model():
    spec = ModelSpec(architecture="lenet", num_classes=10, input_shape=(1, 28, 28), mean=[0.1], std=[0.3])
    model = build_classifier(spec)
    split = prepare(model, spec)
    with torch.no_grad():
        model.net.fc2.bias.add_(1.0)
        x = torch.rand(2, 1, 28, 28)
        torch.testing.assert_close(split.head(split.features(x)), model(x))


def test_named_latent_layer_and_skip_connection_refusal():
    spec = ModelSpec(architecture="resnet18", num_classes=10, input_shape=(3, 32, 32), mean=[0.5], std=[0.2],
                     latent_layer="avgpool")
    assert prepare(build_classifier(spec), spec).latent_shape == (512, 1, 1)
    bad = spec.model_copy(update={"latent_layer": "layer4.1.conv2"})
    with pytest.raises(InputError, match="skip connection"):
        prepare(build_classifier(bad), bad)
    missing = spec.model_copy(update={"latent_layer": "nope"})
    with pytest.raises(InputError, match="is not a layer the model calls"):
        prepare(build_classifier(missing), missing)


def test_normalisation_lives_inside_the_wrapper():
    spec = ModelSpec(architecture="lenet", num_classes=10, input_shape=(1, 28, 28), mean=[0.5], std=[0.5])
    model = build_classifier(spec)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - 0.5) / 0.5))


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"architecture": "nonet"}, "unknown architecture"), ({"mean": [0.1, 0.2]}, "give 1 or C"),
     ({"std": [0.0]}, "positive"), ({"num_classes": 1}, "greater than or equal to 2"),
     ({"input_shape": [1, 0, 28]}, "input_shape")],
)
def test_bad_specs_are_refused(fields, message):
    base = {"architecture": "lenet", "num_classes": 10, "input_shape": [1, 28, 28], "mean": [0.1], "std": [0.3]}
    with pytest.raises(ValueError, match=message):
        ModelSpec.model_validate({**base, **fields})


def test_weights_are_checked_against_the_spec():
    spec = ModelSpec(architecture="lenet", num_classes=10, input_shape=(1, 28, 28), mean=[0.1], std=[0.3])
    model = build_classifier(spec)
    good = net_weights(model)
    with pytest.raises(InputError, match="missing 1 tensors"):
        load_net_weights(model, {k: v for k, v in good.items() if k != "fc2.bias"})
    with pytest.raises(InputError, match="has shape"):
        load_net_weights(model, {**good, "fc2.weight": torch.zeros(5, 500)})
    with pytest.raises(InputError, match="NaN or Inf"):
        load_net_weights(model, {**good, "fc1.bias": torch.full((500,), float("nan"))})
    with pytest.raises(InputError, match="cannot take inputs"):
        small = spec.model_copy(update={"architecture": "vgg11_bn", "input_shape": (1, 16, 16)})
        build_classifier(small)


def test_full_mnist_idx_files_load_with_their_documented_counts():
    from pathlib import Path

    from services.datasets import mnist_idx

    folder = Path(__file__).resolve().parents[2] / "shared/datasets/mnist"
    if not folder.exists():
        pytest.skip("full MNIST is not beside this checkout")
    test = mnist_idx(folder, "t10k")
    assert test.x.shape == (10000, 1, 28, 28) and test.x.dtype == torch.float32
    assert torch.bincount(test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(test.x.mean().item() - 0.1325) < 1e-3
    with pytest.raises(InputError, match="not found"):
        mnist_idx(folder.parent, "train")


def test_latents_and_attacks_restore_each_layers_own_mode():
    from services.method.attacks import fgsm
    from services.method.config import AttackConfig
    from services.method.latents import extract_latents

    spec = ModelSpec(architecture="svhnnet", num_classes=10, input_shape=(3, 32, 32), mean=[0.5], std=[0.25])
    model = build_classifier(spec)  # BatchNorm and dropout
    split = prepare(model, spec)
    x = torch.rand(16, 3, 32, 32)
    for training in (False, True):
        model.train(training)
        running = model.net.features[0][1].running_mean.clone()
        extract_latents(split, x)
        fgsm(model, x, torch.zeros(16, dtype=torch.long), None, AttackConfig(eps=0.1), torch.Generator())
        assert all(m.training == training for m in model.modules())
        assert torch.equal(running, model.net.features[0][1].running_mean)  # eval mode: BN statistics untouched
