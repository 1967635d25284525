"""Where a stage's data lives (placement) and how its arithmetic is set up (numerics): units on the CPU, and the
GPU paths (data moved once, or streamed through pinned memory) marked `cuda`, skipped without a GPU."""

import warnings

import pytest
import torch

from services.method import numerics, placement
from services.method.config import LadderConfig
from services.method.finetune import fit
from services.method.models import ModelSpec, build_classifier

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
SPEC = ModelSpec(architecture="lenet", num_classes=10, input_shape=(1, 28, 28), mean=[0.1307], std=[0.3081])


def _data(n=256):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _fit(device, **kw):
    x, y = _data()
    torch.manual_seed(0)
    model = build_classifier(SPEC).to(device)
    history = fit(model, x, y, epochs=2, lr=0.01, momentum=0.5, batch_size=32, seed=1, **kw)
    return history, {k: v.cpu() for k, v in model.state_dict().items()}


def test_on_the_cpu_placement_is_the_identity():
    cpu = torch.device("cpu")
    x, y = _data(10)
    assert all(a is b for a, b in zip(placement.inputs(cpu, x, y), (x, y)))
    assert torch.equal(placement.batch(x, torch.tensor([3, 1]), cpu), x[[3, 1]])
    out = placement.Gather(cpu)
    out.add(x[:4])
    out.add(x[4:])
    assert torch.equal(out.result(), x)
    assert placement.Gather(cpu).result(x[:0]).shape == (0, 1, 28, 28)
    with pytest.raises(ValueError, match="between 0 and 1"):
        placement.set_share(1.5)


def test_watch_names_the_ops_torch_has_no_deterministic_version_of_and_passes_other_warnings_on():
    message = ("upsample_bilinear2d_backward_out_cuda does not have a deterministic implementation, but you set "
               "'torch.use_deterministic_algorithms(True, warn_only=True)'.")
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        with numerics.watch() as seen:
            warnings.warn(message, stacklevel=1)
            warnings.warn(message, stacklevel=1)
            warnings.warn("something else", stacklevel=1)
    assert seen == ["upsample_bilinear2d_backward_out_cuda"]
    assert [str(w.message) for w in outer] == ["something else"]


def test_setup_asks_for_deterministic_algorithms_and_fp32():
    numerics.setup()
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark and not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32


def test_training_precision_applies_inside_only():
    cpu = torch.device("cpu")
    with numerics.training("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.backends.cudnn.allow_tf32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with numerics.training("fp32", cpu):
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.backends.cudnn.allow_tf32 and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        with numerics.training("fp16", cpu):
            pass


def test_fit_at_bf16_trains_and_differs_from_fp32_which_is_the_default():
    numerics.setup()
    cpu = torch.device("cpu")
    default, w_default = _fit(cpu)
    fp32, w_fp32 = _fit(cpu, precision="fp32")
    bf16, w_bf16 = _fit(cpu, precision="bf16")
    assert default == fp32 and all(torch.equal(w_default[k], w_fp32[k]) for k in w_fp32)
    assert all(torch.isfinite(torch.tensor(bf16))) and bf16 != fp32
    assert all(v.dtype == w_fp32[k].dtype for k, v in w_bf16.items())  # the weights stay fp32
    assert LadderConfig().precision == "fp32"
    with pytest.raises(ValueError):
        LadderConfig.model_validate({"precision": "fp16"})


@cuda
def test_on_a_gpu_data_moves_once_when_it_fits_and_streams_when_it_does_not():
    gpu = torch.device("cuda")
    x, y = _data(64)
    try:
        placement.set_share(0.5)
        assert all(t.device.type == "cuda" for t in placement.inputs(gpu, x, y))
        out = placement.Gather(gpu)
        out.add(x[:8].to(gpu))
        assert out.result().device.type == "cpu" and torch.equal(out.result(), x[:8])
        placement.set_share(0.0)
        kept = placement.inputs(gpu, x, y)
        assert all(t.device.type == "cpu" for t in kept)
        b = placement.batch(kept[0], torch.tensor([5, 2]), gpu)
        assert b.device.type == "cuda" and torch.equal(b.cpu(), x[[5, 2]])
        streamed = placement.Gather(gpu)
        streamed.add(x[:8].to(gpu))
        streamed.add(x[8:16].to(gpu))
        assert torch.equal(streamed.result(), x[:16])
    finally:
        placement.set_share(0.5)


@cuda
def test_on_a_gpu_fit_gives_the_same_numbers_resident_or_streamed_and_twice():
    numerics.setup()
    gpu = torch.device("cuda")
    try:
        placement.set_share(0.5)
        resident = _fit(gpu)
        again = _fit(gpu)
        placement.set_share(0.0)
        streamed = _fit(gpu)
    finally:
        placement.set_share(0.5)
    for other in (again, streamed):
        assert other[0] == resident[0] and all(torch.equal(other[1][k], resident[1][k]) for k in resident[1])
    cpu_history, _ = _fit(torch.device("cpu"))
    assert abs(cpu_history[-1] - resident[0][-1]) < 1e-3  # the GPU and the CPU agree to within float rounding


@cuda
def test_on_a_gpu_tf32_and_bf16_train_and_keep_the_weights_fp32():
    numerics.setup()
    gpu = torch.device("cuda")
    for precision in ("tf32", "bf16"):
        history, weights = _fit(gpu, precision=precision)
        assert all(torch.isfinite(torch.tensor(history))) and all(v.dtype == torch.float32 for v in weights.values()
                                                                  if v.is_floating_point())
