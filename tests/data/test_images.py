"""decode_image / decode_pil: every format path, every refusal, and size checks made from the header alone."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from prodcat.data.images import ALLOWED_FORMATS, ImageDecodeError, decode_image, decode_image_sized, decode_pil


def photo(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture (JPEG-friendly, so round-trip errors stay small)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200 + 20
    return np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def as_hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy().astype(np.int16)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_rgb_jpeg_matches_pillow() -> None:
    data = encode(Image.fromarray(photo()), "JPEG", quality=92)
    decoded = decode_image(data)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 48, 64)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
    assert np.abs(as_hwc(decoded) - reference).mean() < 1.0
    assert np.abs(as_hwc(decoded) - photo().astype(np.int16)).mean() < 4.0


def test_accepts_bytearray_and_memoryview_refuses_other_types() -> None:
    data = encode(Image.fromarray(photo()), "JPEG")
    assert torch.equal(decode_image(bytearray(data)), decode_image(memoryview(data)))
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_grayscale_jpeg_gives_three_equal_channels() -> None:
    gray = Image.fromarray(photo()).convert("L")
    decoded = decode_image(encode(gray, "JPEG", quality=95))
    assert decoded.shape == (3, 48, 64)
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[1], decoded[2])
    assert np.abs(decoded[0].numpy().astype(np.int16) - np.asarray(gray, dtype=np.int16)).mean() < 3.0


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    rgb = Image.fromarray(photo())
    data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    decoded = decode_image(data)
    assert decoded.shape == (3, 48, 64)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    assert np.abs(as_hwc(decoded) - reference).mean() < 2.0
    assert np.abs(as_hwc(decoded) - np.asarray(rgb, dtype=np.int16)).mean() < 6.0


def test_png_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 10, 30)
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom half fully transparent (black underneath)
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded.shape == (3, 8, 8)
    assert decoded[:, 0, 0].tolist() == [200, 10, 30]
    assert decoded[:, 7, 7].tolist() == [255, 255, 255]


def test_palette_with_transparency_and_gif() -> None:
    palette = Image.fromarray(photo(16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    decoded = decode_image(encode(palette, "PNG", transparency=0))
    assert decoded.shape == (3, 16, 16) and decoded.dtype == torch.uint8
    assert decode_image(encode(Image.fromarray(photo(16, 16)), "GIF")).shape == (3, 16, 16)


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped() -> None:
    values = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"))
    assert decoded.shape == (3, 16, 16)
    assert int(decoded.max()) == 255 and int(decoded.min()) == 0 and int(decoded[0, 8, 0]) > 100


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encode(Image.fromarray(photo(64, 48)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).shape == (3, 64, 48)
    assert decode_pil(data).size == (48, 64)


def test_decode_pil_returns_rgb_matching_decode_image() -> None:
    data = encode(Image.fromarray(photo()), "PNG")
    image = decode_pil(data)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert np.array_equal(np.asarray(image), decode_image(data).permute(1, 2, 0).numpy())


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg_raises(cut: float) -> None:
    data = encode(Image.fromarray(photo(128, 96)), "JPEG", quality=95)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: int(len(data) * cut)])


def test_truncated_png_raises_and_pillow_stays_strict() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = encode(Image.fromarray(photo(128, 96)), "PNG")
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_jpeg_header_only_raises() -> None:
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(b"\xff\xd8\xff\xe0\x00\x10JFIF")


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty"), (b"hello, this is not a picture" * 4, "not an image"), (bytes(range(256)) * 8, "not an image")],
)
def test_empty_and_garbage_raise(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)
    with pytest.raises(ImageDecodeError):
        decode_pil(data)


def test_huge_png_header_is_refused_before_decoding() -> None:
    # A 57-byte file claiming 100000 x 100000 RGB pixels (30 GB once decoded): the IHDR alone must stop it.
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    data = b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
    with pytest.raises(ImageDecodeError, match=r"too many pixels \(100000 x 100000\)"):
        decode_image(data)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_pil(data)


def test_huge_jpeg_header_is_refused_before_decoding() -> None:
    data = bytearray(encode(Image.fromarray(photo(64, 48)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 50_000)  # height, width
    with pytest.raises(ImageDecodeError, match=r"too many pixels \(50000 x 60000\)"):
        decode_image(bytes(data))


def test_max_pixels_is_configurable() -> None:
    data = encode(Image.fromarray(photo(64, 48)), "JPEG")
    assert decode_image(data, max_pixels=64 * 48).shape == (3, 48, 64)
    with pytest.raises(ImageDecodeError, match=r"too many pixels \(64 x 48\)"):
        decode_image(data, max_pixels=64 * 48 - 1)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image(encode(Image.fromarray(photo(64, 48)), "PNG"), max_pixels=100)


# -- formats: only what a seller uploads ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "TGA", "PCX", "EPS", "SGI"])
def test_formats_outside_the_allow_list_are_never_opened(fmt: str) -> None:
    image = Image.fromarray(photo(32, 32))
    data = encode(image if fmt != "EPS" else image.convert("L"), fmt) if fmt != "EPS" else b"%!PS-Adobe-3.0 EPSF-3.0\n"
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(data)
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_pil(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode(fmt: str) -> None:
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP")
    assert decode_image(encode(Image.fromarray(photo(40, 30)), fmt)).shape == (3, 30, 40)


@pytest.mark.parametrize("error", [AttributeError("x"), IndexError("y"), KeyError("z"), ZeroDivisionError("w")])
def test_any_decoder_exception_becomes_image_decode_error(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    from PIL import PngImagePlugin

    def broken_load(self: object) -> None:
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken_load)
    with pytest.raises(ImageDecodeError, match=f"corrupt PNG \\({type(error).__name__}"):
        decode_image(encode(Image.fromarray(photo()), "PNG"))


def test_any_exception_while_opening_becomes_image_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import GifImagePlugin

    def broken_open(self: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'read'")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_open", broken_open)
    with pytest.raises(ImageDecodeError, match="corrupt image header"):
        decode_image(encode(Image.fromarray(photo()), "GIF"))


# -- reduced decoding (the server) ---------------------------------------------------------------------------------
def test_reduce_to_leaves_pictures_smaller_than_twice_the_target_bit_identical() -> None:
    for fmt in ("JPEG", "PNG"):
        data = encode(Image.fromarray(photo(180, 180)), fmt)
        assert torch.equal(decode_image(data, reduce_to=(180, 180)), decode_image(data))
        data = encode(Image.fromarray(photo(359, 300)), fmt)
        assert torch.equal(decode_image(data, reduce_to=(180, 180)), decode_image(data))


def test_big_jpeg_is_dct_scaled_never_below_the_target() -> None:
    data = encode(Image.fromarray(photo(1600, 1200)), "JPEG", quality=90)
    decoded = decode_image_sized(data, reduce_to=(180, 180))
    assert (decoded.width, decoded.height) == (1600, 1200)  # the picture as uploaded
    height, width = decoded.pixels.shape[-2:]
    assert 180 <= height < 360 and 180 <= width < 360  # 1/4 by DCT scaling (400 x 300), then halved per axis
    full = Image.fromarray(decode_image(data).permute(1, 2, 0).numpy()).resize((width, height), Image.Resampling.BOX)
    assert np.abs(as_hwc(decoded.pixels) - np.asarray(full, dtype=np.int16)).mean() < 3.0


def test_big_png_is_reduced_per_axis_in_strips_matching_a_whole_reduce() -> None:
    picture = Image.fromarray(photo(1000, 3000))
    decoded = decode_image_sized(encode(picture, "PNG"), reduce_to=(224, 224))
    assert (decoded.width, decoded.height) == (1000, 3000)
    assert decoded.pixels.shape == (3, 231, 250)  # factors 4 (x) and 13 (y): >= 224 on both axes
    assert np.array_equal(as_hwc(decoded.pixels), np.asarray(picture.reduce((4, 13)), dtype=np.int16))


def test_reduced_alpha_palette_and_sixteen_bit_pictures() -> None:
    rgba = np.zeros((800, 800, 4), np.uint8)
    rgba[..., :3] = (200, 10, 30)
    rgba[:400, :, 3] = 255  # top half opaque red, bottom half transparent black
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), reduce_to=(100, 100))
    assert decoded.shape == (3, 100, 100)
    assert decoded[:, 0, 0].tolist() == [200, 10, 30] and decoded[:, 99, 99].tolist() == [255, 255, 255]
    palette = Image.fromarray(photo(400, 400)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    assert decode_image(encode(palette, "GIF"), reduce_to=(100, 100)).shape == (3, 100, 100)
    values = np.linspace(0, 65535, 400 * 400).reshape(400, 400).astype(np.uint16)
    sixteen = decode_image(encode(Image.fromarray(values), "PNG"), reduce_to=(100, 100))
    assert sixteen.shape == (3, 100, 100) and int(sixteen.max()) >= 250 and int(sixteen.min()) <= 5


def test_reduce_keeps_exif_orientation_and_reports_the_upright_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(photo(800, 400)), "JPEG", exif=exif.tobytes())
    decoded = decode_image_sized(data, reduce_to=(100, 100))
    assert (decoded.width, decoded.height) == (400, 800)
    height, width = decoded.pixels.shape[-2:]
    assert height >= width >= 100
    upright = Image.fromarray(decode_image(data).permute(1, 2, 0).numpy())  # libjpeg-turbo applies EXIF itself
    expected = np.asarray(upright.resize((width, height), Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(as_hwc(decoded.pixels) - expected).mean() < 3.0


def test_reduce_to_is_checked() -> None:
    with pytest.raises(ValueError, match="reduce_to"):
        decode_image(encode(Image.fromarray(photo()), "PNG"), reduce_to=(0, 10))


def test_webp_counts_four_times_its_pixels_against_the_limit() -> None:
    picture = Image.fromarray(photo(100, 100))
    assert decode_image(encode(picture, "PNG"), max_pixels=20_000).shape == (3, 100, 100)
    with pytest.raises(ImageDecodeError, match=r"too many pixels \(100 x 100; WEBP counts 4x"):
        decode_image(encode(picture, "WEBP"), max_pixels=20_000)
    assert decode_image(encode(picture, "WEBP"), max_pixels=40_000).shape == (3, 100, 100)
