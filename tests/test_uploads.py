"""Upload checks: every bad upload of the corpus refused with its status and message, the valid job accepted and
loaded, custom networks (.pt2) scanned, tried in a child process and trained, and memory bounded on big files."""

import copy
import io
import json
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save, save_file

from api.problems import status_of
from services.errors import InputError
from services.method.finetune import fit
from services.method.models import (
    ModelSpec,
    build_classifier,
    load_net_weights,
    net_weights,
    prepare,
)
from services.uploads import (
    DataInfo,
    Limits,
    check_data,
    check_model,
    check_part,
    load_data,
    load_model,
    parse_config,
)
from tests.bad_uploads import (
    CUSTOM_SPEC,
    LIMITS,
    PWNED_MARKER,
    SPEC,
    corpus,
    custom_parts,
    exported,
    good_parts,
    image_zip,
    npz,
    pick,
    png,
    rezip,
    validate_parts,
    weights,
)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("corpus"))


def test_the_corpus_covers_every_kind_of_bad_upload(cases):
    assert len(cases) >= 24
    assert len({c.name for c in cases}) == len(cases)
    assert {c.status for c in cases} == {413, 415, 422}
    assert all(c.fragment == c.fragment.lower() for c in cases)
    assert {c.name for c in cases if c.http_only} == {"wrong content type", "oversized part", "missing part"}


def test_every_bad_upload_is_refused_with_its_status_and_a_message_that_says_what_is_wrong(cases, tmp_path):
    wrong = []
    for case in cases:
        try:
            validate_parts(case.parts, tmp_path, LIMITS)
            wrong.append(f"{case.name}: accepted")
        except InputError as e:
            message = str(e)
            if status_of(e) != case.status or case.fragment not in message.lower() or "\n" in message:
                wrong.append(f"{case.name}: {status_of(e)} {message!r}, wanted {case.status} with {case.fragment!r}")
    assert not wrong, "\n".join(wrong)
    assert not PWNED_MARKER.exists()


def test_planted_code_is_refused_on_the_worker_side_too_and_never_runs(cases, tmp_path):
    spec = ModelSpec.model_validate(CUSTOM_SPEC)
    for case in cases:
        if case.name.startswith(("pt2 planted pickle", "pt2 size expression", "pt2 graph calls")):
            path = tmp_path / "model"
            path.write_bytes(case.parts["model"][1])
            refusal = "pickle that calls posix.system|pickle with opcode|size expression|not an allowed PyTorch operator"
            with pytest.raises(InputError, match=refusal):
                load_model(path, "pt2", spec, LIMITS)
    assert not PWNED_MARKER.exists()


def test_the_good_job_passes_and_loads_as_a_working_model_and_the_right_tensors(tmp_path):
    checked = validate_parts(good_parts(tmp_path), tmp_path, LIMITS)
    assert checked.model_format == "safetensors"
    assert checked.config.seed == 1 and checked.config.finetune.epochs == 2
    assert checked.data == {"train_data": DataInfo("npz", 300, [30] * 10), "test_data": DataInfo("npz", 100, [10] * 10)}
    model = load_model(checked.paths["model"], "safetensors", checked.spec)
    assert not model.training
    x, y = pick(30)
    train = load_data(checked.paths["train_data"], "npz", checked.spec, "train_data")
    assert train.x.dtype == torch.float32 and train.x.shape == (300, 1, 28, 28)
    torch.testing.assert_close(train.x, torch.from_numpy(x).float() / 255)
    assert torch.equal(train.y, torch.from_numpy(y))
    reference = build_classifier(checked.spec, weights())
    with torch.no_grad():
        torch.testing.assert_close(model(train.x), reference(train.x))


@pytest.mark.parametrize("layout", ["image-folder zip", "N×H×W×C", "N×H×W", "float32"])
def test_other_data_layouts_give_the_same_tensors(layout, tmp_path):
    spec = ModelSpec.model_validate(SPEC)
    x, y = pick(30)
    if layout == "image-folder zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, content in image_zip().items():
                z.writestr(name, content)
        name, content, fmt = "digits.zip", buf.getvalue(), "zip"
    else:
        arrays = {"N×H×W×C": x.transpose(0, 2, 3, 1), "N×H×W": x[:, 0], "float32": x.astype(np.float32) / 255}
        name, content, fmt = "train.npz", npz(x=arrays[layout], y=y), "npz"
    path = tmp_path / "train_data"
    path.write_bytes(content)
    assert check_data(path, name, spec, LIMITS, "train_data") == DataInfo(fmt, 300, [30] * 10)
    data = load_data(path, fmt, spec, "train_data")
    torch.testing.assert_close(data.x, torch.from_numpy(x).float() / 255)
    assert torch.equal(data.y, torch.from_numpy(y))


def test_an_image_folder_zip_of_colour_and_grey_images_gives_rgb(tmp_path):
    spec = ModelSpec(architecture="resnet18", num_classes=2, input_shape=(3, 8, 8), mean=[0.5], std=[0.25])
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    images[5] = images[5, :, :, :1]  # stored as a greyscale PNG below: read back with three equal channels
    path = tmp_path / "train_data"
    with zipfile.ZipFile(path, "w") as z:
        for i, img in enumerate(images):
            z.writestr(f"{'cat' if i < 3 else 'dog'}/{i}.png", png(img[:, :, 0] if i == 5 else img))
    assert check_data(path, "pets.zip", spec, LIMITS, "train_data") == DataInfo("zip", 6, [3, 3])
    data = load_data(path, "zip", spec, "train_data")
    torch.testing.assert_close(data.x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert data.y.tolist() == [0, 0, 0, 1, 1, 1]


def _png16(grey16: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG (PIL opens it as mode I;16)."""
    buf = io.BytesIO()
    Image.fromarray(grey16.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _image(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _image_zip(images: list[bytes], spec: ModelSpec, tmp_path, suffix: str = "png"):
    """An image-folder zip of `images` (first half class a, second half class b), checked and loaded."""
    path = tmp_path / "train_data"
    with zipfile.ZipFile(path, "w") as z:
        for i, content in enumerate(images):
            z.writestr(f"{'a' if i < len(images) // 2 else 'b'}/{i}.{suffix}", content)
    assert check_data(path, "images.zip", spec, LIMITS, "train_data") == DataInfo("zip", len(images), [len(images) // 2] * 2)
    return load_data(path, "zip", spec, "train_data")


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped_to_white(channels, tmp_path):
    spec = ModelSpec(architecture="resnet18", num_classes=2, input_shape=(channels, 8, 8), mean=[0.5], std=[0.25])
    grey = np.random.default_rng(0).integers(0, 256, (6, 8, 8), dtype=np.uint8)
    grey16 = grey.astype(np.uint32) * 257  # 8-bit v is 16-bit v·257: read back as v exactly
    grey16[0, 0, :4] = [0, 128, 129, 65535]  # rounded: v/257 → 0, 0, 1, 255
    data = _image_zip([_png16(g) for g in grey16], spec, tmp_path)
    want = grey.copy()
    want[0, 0, :4] = [0, 0, 1, 255]
    torch.testing.assert_close(data.x, torch.from_numpy(want)[:, None].expand(-1, channels, -1, -1).float() / 255)


def test_opaque_alpha_palette_bilevel_and_grey_with_alpha_images_decode_to_their_colours(tmp_path):
    spec = ModelSpec(architecture="resnet18", num_classes=2, input_shape=(3, 8, 8), mean=[0.5], std=[0.25])
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    bits = rng.integers(0, 2, (8, 8), dtype=bool)
    palette = Image.frombytes("RGB", (8, 8), rgb.tobytes()).quantize(16)
    images = [
        _image(Image.frombytes("RGBA", (8, 8), np.dstack([rgb, np.full((8, 8), 255, np.uint8)]).tobytes())),
        _image(Image.frombytes("LA", (8, 8), np.dstack([grey, np.full((8, 8), 255, np.uint8)]).tobytes())),
        _image(palette),
        _image(palette, "GIF"),
        _image(Image.fromarray(bits)),
        _image(Image.frombytes("RGB", (8, 8), rgb.tobytes()), "BMP"),
    ]
    want = np.stack([rgb, np.repeat(grey[..., None], 3, 2), np.asarray(palette.convert("RGB")),
                     np.asarray(palette.convert("RGB")), np.repeat(bits[..., None] * np.uint8(255), 3, 2), rgb])
    data = _image_zip(images, spec, tmp_path)
    torch.testing.assert_close(data.x, torch.from_numpy(want).permute(0, 3, 1, 2).float() / 255)


def _rezipped(data: bytes, comment: bytes = b"", compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", compression) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.comment = comment
    return out.getvalue()


def test_honest_zip_variants_and_npy_layouts_pass_and_load_the_same_tensors(tmp_path):
    from tests.bad_uploads import _zip64_end

    spec = ModelSpec.model_validate(SPEC)
    x, y = pick(30)
    plain = npz(x=x, y=y)
    variants = {
        "zip64 end record": _zip64_end(plain),
        "archive comment": _rezipped(plain, comment=b"made by hand PK"),
        "deflated": _rezipped(plain, compression=zipfile.ZIP_DEFLATED),
        "fortran-order big-endian": npz(x=np.asfortranarray((x / 255).astype(">f4")), y=y.astype(">i2")),
        "labels as uint8": npz(x=x, y=y.astype(np.uint8)),
    }
    for name, content in variants.items():
        path = tmp_path / "train_data"
        path.write_bytes(content)
        assert check_data(path, "train.npz", spec, LIMITS, "train_data") == DataInfo("npz", 300, [30] * 10), name
        data = load_data(path, "npz", spec, "train_data")
        torch.testing.assert_close(data.x, torch.from_numpy(x).float() / 255, msg=name)
        assert torch.equal(data.y, torch.from_numpy(y)), name


def test_a_zip_that_lies_about_its_member_count_is_refused_before_zipfile_reads_its_directory(tmp_path, monkeypatch):
    from tests.bad_uploads import _many_entries

    path = tmp_path / "train_data"
    path.write_bytes(_many_entries(npz(x=pick(30)[0], y=pick(30)[1]), 50_000))  # the end record still says 2
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", lambda self: pytest.fail("zipfile parsed the directory"))
    with pytest.raises(InputError, match="holds more than 1000 files; the limit is 1000") as e:
        check_data(path, "train.npz", ModelSpec.model_validate(SPEC), LIMITS, "train_data")
    assert status_of(e.value) == 413


def test_zoo_networks_are_built_on_the_meta_device_only(tmp_path, monkeypatch):
    from services.uploads import weights as uploads

    devices = []
    real_build = uploads.build_net

    def build(spec):
        devices.append(torch.get_default_device().type)
        return real_build(spec)

    monkeypatch.setattr(uploads, "build_net", build)
    spec = ModelSpec(architecture="regnet_x_400mf", num_classes=10, input_shape=(3, 32, 32), mean=[0.5], std=[0.25],
                     latent_layer="fc")
    torch.manual_seed(0)
    weights_of = {k: v.contiguous() for k, v in build_classifier(spec).net.state_dict().items()}
    path = tmp_path / "model"
    save_file(weights_of, str(path))
    limits = replace(LIMITS, model_bytes=64 * 2**20)
    assert check_model(path, "regnet.safetensors", spec, limits) == "safetensors"
    assert devices == ["meta"]  # regnet computes its widths with tensors: on the CPU, its parameters on meta
    with pytest.raises(InputError, match="latent_layer 'trunk_output.block9' is not a layer of regnet_x_400mf"):
        check_model(path, "regnet.safetensors", spec.model_copy(update={"latent_layer": "trunk_output.block9"}), limits)
    with pytest.raises(InputError, match="has 5,098,986 parameters, beyond the limit of 1,000,000") as e:
        check_model(path, "regnet.safetensors", spec, replace(limits, model_parameters=1_000_000))
    assert status_of(e.value) == 413


def test_a_network_that_cannot_be_built_on_meta_is_left_to_the_worker_after_the_header_and_values(tmp_path, monkeypatch):
    from services.uploads import weights as uploads

    def build(spec):
        if torch.get_default_device().type == "meta":
            raise InputError("torchvision could not build 'x': Cannot copy out of meta tensor; no data!")
        pytest.fail("the API built a network for real")

    monkeypatch.setattr(uploads, "build_net", build)
    spec = ModelSpec.model_validate(SPEC)
    path = tmp_path / "model"
    path.write_bytes(save(weights()))
    assert check_model(path, "lenet.safetensors", spec, LIMITS) == "safetensors"
    nan = {**weights(), "fc1.bias": torch.full((500,), float("nan"))}
    path.write_bytes(save(nan))
    with pytest.raises(InputError, match="fc1.bias contains NaN or Inf"):
        check_model(path, "lenet.safetensors", spec, LIMITS)


def test_latent_layers_are_module_paths():
    for layer in ("fc1", "layer4.1.conv2", "features.0", "Mixed_7c"):
        ModelSpec.model_validate({**SPEC, "latent_layer": layer})
    for layer in ("", "fc1.", ".fc1", "fc1..conv", "__class__", "fc1.__dict__", "_modules", "fc 1", "fc1\n", "f\u0441"):
        with pytest.raises(ValueError, match="is not a module path"):
            ModelSpec.model_validate({**SPEC, "latent_layer": layer})


def test_a_custom_network_is_checked_in_the_sandbox_rebuilt_split_and_trained(tmp_path):
    checked = validate_parts(custom_parts(tmp_path), tmp_path, LIMITS)
    assert checked.model_format == "graph"  # converted in the sandbox: the worker never deserialises the archive
    model = load_model(checked.paths["model"], "graph", checked.spec)
    train = load_data(checked.paths["train_data"], "npz", checked.spec, "train_data")
    reference = build_classifier(ModelSpec.model_validate(SPEC), weights())
    with torch.no_grad():
        torch.testing.assert_close(model(train.x), reference(train.x), atol=1e-5, rtol=1e-5)
    split = prepare(model, checked.spec)
    assert split.dim == 500  # the input of LeNet's last linear layer, found among the exported aten ops
    tuned = copy.deepcopy(model)
    losses = fit(tuned, train.x, train.y, epochs=2, lr=0.01, momentum=0.5, batch_size=64, seed=0)
    assert losses[1] < losses[0]
    assert not torch.equal(net_weights(tuned)["fc2.weight"], net_weights(model)["fc2.weight"])
    load_net_weights(model, net_weights(tuned))
    with torch.no_grad():
        torch.testing.assert_close(model(train.x), tuned.eval()(train.x))


def test_a_pickle_that_torch_would_load_in_full_is_refused(tmp_path):
    # tensors only, but protocol 4: torch's weights-only loader fails on it and torch.export.load then unpickles it in full
    buf = io.BytesIO()
    torch.save(((torch.rand(2, 1, 28, 28),), {}), buf, pickle_protocol=4)
    path = tmp_path / "model"
    path.write_bytes(rezip(exported(), {"sample_inputs/model.pt": buf.getvalue()}))
    with pytest.raises(InputError, match="opcode.*FRAME.*which torch's weights-only loader refuses"):
        load_model(path, "pt2", ModelSpec.model_validate(CUSTOM_SPEC), LIMITS)


def test_the_child_load_has_a_time_limit(tmp_path):
    path = tmp_path / "model"
    path.write_bytes(exported())
    with pytest.raises(InputError, match="took longer than 1 s") as e:
        check_model(path, "net.pt2", ModelSpec.model_validate(CUSTOM_SPEC), replace(LIMITS, pt2_timeout_s=1))
    assert status_of(e.value) == 422


def test_allowed_pickle_globals_are_a_subset_of_what_weights_only_loading_allows():
    from torch._weights_only_unpickler import _get_allowed_globals

    from services.uploads.pt2 import _PICKLE_GLOBALS

    assert _PICKLE_GLOBALS <= set(_get_allowed_globals())
    assert "posix.system" not in _PICKLE_GLOBALS and "builtins.eval" not in _PICKLE_GLOBALS


def test_limits_come_from_the_settings():
    from services.settings import Settings

    s = Settings(max_model_bytes=5, max_zip_ratio=7, pt2_load_timeout_s=9, max_num_classes=11, max_model_parameters=13)
    limits = Limits.from_settings(s)
    assert (limits.model_bytes, limits.zip_ratio, limits.pt2_timeout_s) == (5, 7, 9)
    assert (limits.num_classes, limits.model_parameters) == (11, 13)
    assert (Limits.from_settings(Settings()).num_classes, Limits.from_settings(Settings()).model_parameters) == (
        LIMITS.num_classes, LIMITS.model_parameters)  # the corpus's, which the HTTP tests send to a default server
    assert limits.unzipped_bytes == s.max_unzipped_bytes and limits.pt2_memory_bytes == s.pt2_load_memory_bytes


def test_part_headers():
    check_part("model_spec", None, "application/json; charset=utf-8")
    check_part("config", "config.json", None)
    check_part("train_data", "digits.ZIP", "application/x-zip-compressed")
    check_part("train_data", "données d’entraînement ✓.npz", None)  # any printable name
    for args, status, message in [
        (("weights", "w.safetensors", None), 422, "unknown part 'weights'"),
        (("model", None, None), 415, "must be a file named"),
        (("model", "m.safetensors", "text/plain"), 415, "content type text/plain"),
        (("model_spec", "spec.yaml", None), 415, "is not .json"),
        (("model", "lenet\x00.safetensors", None), 422, "control or invisible character U\\+0000"),
        (("config", "config\n.json", None), 422, "U\\+000A"),
        (("train_data", "a\u2028b.npz", None), 422, "U\\+2028"),
    ]:
        with pytest.raises(InputError, match=message) as e:
            check_part(*args)
        assert status_of(e.value) == status


def test_absent_or_empty_config_means_the_defaults():
    assert parse_config(None) == parse_config(b"") == parse_config(b" \n") == parse_config(b"{}")
    assert parse_config(json.dumps({"finetune": {"alpha": 0.75}}).encode()).finetune.alpha == 0.75


_MEASURE = """
import sys, time, tracemalloc
from dataclasses import replace
from pathlib import Path
from services.method.models import ModelSpec
from services.uploads import check_data
from tests.bad_uploads import LIMITS, SPEC
spec = ModelSpec.model_validate(SPEC)
path = Path(sys.argv[1])
tracemalloc.start()
started = time.perf_counter()
info = check_data(path, "big.npz", spec, replace(LIMITS, data_bytes=1 << 30, unzipped_bytes=1 << 30), "train_data")
print(info.n, tracemalloc.get_traced_memory()[1], time.perf_counter() - started)
"""


@pytest.mark.slow
def test_checking_a_200_mb_npz_stays_in_bounded_memory(tmp_path):
    n = 255_000  # × 784 bytes ≈ 200 MB of uint8 pixels
    path = tmp_path / "big.npz"
    with zipfile.ZipFile(path, "w") as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, 28, 28)})
            block = np.random.default_rng(0).integers(0, 256, 1000 * 784, dtype=np.uint8).tobytes()
            for _ in range(n // 1000):
                f.write(block)
        y = io.BytesIO()
        np.save(y, np.arange(n) % 10)
        z.writestr("y.npy", y.getvalue())
    assert path.stat().st_size > 200_000_000
    # a fresh interpreter: the peak is this check's alone
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, check=True)
    count, peak, seconds = out.stdout.split()
    assert int(count) == n
    assert int(peak) < 50 * 2**20
    assert float(seconds) < 10
