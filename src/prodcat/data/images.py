"""Image decoding: bytes -> uint8 (3, H, W) RGB tensors, safely.

Only the formats a seller uploads are opened: JPEG, PNG, WebP, GIF and BMP (`ALLOWED_FORMATS`). Pillow knows ~44
formats, some with fragile decoders or external helpers (EPS runs Ghostscript); none of the others is ever tried.
Every failure of a decoder, whatever it raises, becomes an `ImageDecodeError`.

JPEG (nearly all of Cdiscount) goes through libjpeg-turbo via torchvision's decoder op; everything else and any JPEG
that op cannot handle goes through Pillow. The declared size is read from the header and checked before any pixel
is decoded, so a tiny file that claims to be 100000 x 100000 is refused without allocating.

`reduce_to=(H, W)` (the server: the model resizes to its input size anyway) decodes pictures larger than needed
reduced: JPEGs by libjpeg's DCT scaling (1/2, 1/4, 1/8, never below the size asked for), then any format by whole
factors per axis, in strips, so no full-size RGB(A) copy is ever made beside the decoded picture. Pictures not at
least twice the size asked for on some axis (all of Cdiscount at 180x180) decode exactly as without it.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageDecodeError",
    "decode_image",
    "decode_image_sized",
    "decode_pil",
]

DEFAULT_MAX_PIXELS = 40_000_000
# Pillow format ids. MPO (multi-picture JPEG from phones) is opened by the JPEG plugin itself.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow's WebP decoder (libwebp's animation decoder) holds ~4 full-size RGBA copies while it decodes (~180 MB for
# 12 MP, measured), against one full-size picture for the others: a WebP picture counts this many times its pixels.
_PIXEL_COST = {"WEBP": 4}
_STRIP_PIXELS = 1 << 20  # source pixels per strip when reducing: a few MB whatever the picture's size

# A half-decoded picture padded with grey must raise, never pass as a product photo.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image; `reason` is a short, stable description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels and the size of the picture as stored (upright), before any reduction."""

    pixels: torch.Tensor  # uint8 (3, H, W) RGB
    width: int
    height: int


def _jpeg_op() -> Callable[..., torch.Tensor] | None:
    # The op itself, not torchvision.io.decode_jpeg: the Python wrapper warns (deprecated since 0.29) on every call.
    try:
        import torchvision.io.image  # noqa: F401  (loads the image extension)

        return torch.ops.image.decode_jpeg
    except (ImportError, AttributeError, RuntimeError):
        return None


_DECODE_JPEG = _jpeg_op()
_RGB_MODE = 3  # torchvision.io.ImageReadMode.RGB.value


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the first start-of-frame segment, or None when there is none."""
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            if pos + 10 > size:
                return None
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            return width, height, data[pos + 9]
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _png_header(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(f"too many pixels ({width} x {height})")


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"expected bytes, got {type(data).__name__}")


def _check_reduce_to(reduce_to: tuple[int, int] | None) -> None:
    if reduce_to is not None and (len(reduce_to) != 2 or min(reduce_to) < 1):
        raise ValueError(f"reduce_to must be (height, width) >= 1, got {reduce_to}")


def _worth_reducing(width: int, height: int, reduce_to: tuple[int, int] | None) -> bool:
    """Whether some axis is at least twice what is needed, in either orientation (EXIF is not read yet)."""
    if reduce_to is None:
        return False
    need_h, need_w = reduce_to
    return max(width // need_w, height // need_h, width // need_h, height // need_w) >= 2


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Decode an encoded image into a uint8 (3, H, W) RGB tensor (HWC-strided, ready for channels_last batches).

    `reduce_to=(H, W)`: the picture may come out smaller, by whole factors, but never below (H, W) where it was
    larger (see the module docstring). Raises ImageDecodeError: "empty", "truncated JPEG", "not an image",
    "too many pixels (W x H)", "corrupt PNG (...)", ...
    """
    return decode_image_sized(data, max_pixels=max_pixels, reduce_to=reduce_to).pixels


def decode_image_sized(
    data: bytes | bytearray | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduce_to: tuple[int, int] | None = None,
) -> DecodedImage:
    """`decode_image`, with the picture's stored (upright) size beside the possibly reduced pixels."""
    _check_reduce_to(reduce_to)
    data = _as_bytes(data)
    if not data:
        raise ImageDecodeError("empty")
    if data.startswith(_JPEG_MAGIC):
        header = _jpeg_header(data)
        if header is None:
            raise ImageDecodeError("truncated JPEG (no frame header)")
        width, height, components = header
        if height > 0:  # height 0 means "declared later" (DNL); let Pillow deal with that rarity
            _check_pixels(width, height, max_pixels)
        turbo = _DECODE_JPEG is not None and height > 0 and components in (1, 3, 4)
        if turbo and not _worth_reducing(width, height, reduce_to):
            decoded = _decode_jpeg_turbo(data)
            if decoded is not None:
                return DecodedImage(decoded, int(decoded.shape[-1]), int(decoded.shape[-2]))
    image, (width, height) = _decode_with_pillow(data, max_pixels, reduce_to)
    return DecodedImage(_pil_to_tensor(image), width, height)


def _decode_jpeg_turbo(data: bytes) -> torch.Tensor | None:
    """libjpeg-turbo decode; None to let Pillow try (unusual JPEG flavours), ImageDecodeError when truncated."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        # mode RGB also converts grayscale and CMYK/YCCK; EXIF orientation matters for phone photos in the server.
        return _DECODE_JPEG(encoded, _RGB_MODE, True)
    except RuntimeError as error:
        if "truncated" in str(error).lower() or "incomplete" in str(error).lower():
            raise ImageDecodeError("truncated JPEG") from None
        return None


def decode_pil(data: bytes | bytearray | memoryview, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode with Pillow into an RGB PIL image (alpha composited on white), with the same checks as decode_image."""
    data = _as_bytes(data)
    if not data:
        raise ImageDecodeError("empty")
    return _decode_with_pillow(data, max_pixels, None)[0]


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if not isinstance(error, OSError | SyntaxError) else str(error)
    return text if len(text) <= 120 else text[:117] + "..."


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    png = _png_header(data) if data.startswith(_PNG_MAGIC) else None
    if png is not None:
        _check_pixels(*png, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies just below
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"too many pixels (more than {2 * (Image.MAX_IMAGE_PIXELS or 0)})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image") from None
    except Exception as error:  # noqa: BLE001 - a plugin parsing a hostile header may raise anything
        raise ImageDecodeError(f"corrupt image header ({_short(error)})") from None
    cost = _PIXEL_COST.get(image.format or "", 1)
    if image.width * image.height * cost > max_pixels:
        extra = f"; {image.format} counts {cost}x its pixels (its decoder keeps {cost} copies)" if cost > 1 else ""
        raise ImageDecodeError(f"too many pixels ({image.width} x {image.height}{extra})")
    return image


def _decode_with_pillow(
    data: bytes, max_pixels: int, reduce_to: tuple[int, int] | None
) -> tuple[Image.Image, tuple[int, int]]:
    """The RGB picture (upright, maybe reduced) and the upright (width, height) of the picture as stored."""
    image = _open_checked(data, max_pixels)
    kind = image.format or "image"
    stored = image.size
    try:
        if reduce_to is not None and isinstance(image, _jpeg_class()) and _worth_reducing(*stored, reduce_to):
            need = max(reduce_to)  # DCT scaling is the same on both axes, and EXIF may swap them
            image.draft(None, (need, need))
        image.load()
        orientation = _orientation(image)
        swapped = orientation in (5, 6, 7, 8)
        if reduce_to is None:
            image = _to_rgb(image)
        else:
            image = _reduce_to_rgb(image, reduce_to[::-1] if swapped else reduce_to)
        if orientation in _TRANSPOSE:
            image = image.transpose(_TRANSPOSE[orientation])
    except OSError as error:
        if "truncated" in str(error).lower():
            raise ImageDecodeError(f"truncated {kind}") from None
        raise ImageDecodeError(f"corrupt {kind} ({_short(error)})") from None
    except Exception as error:  # noqa: BLE001 - decoders fed hostile bytes raise anything (SPIDER: AttributeError)
        raise ImageDecodeError(f"corrupt {kind} ({_short(error)})") from None
    return image, (stored[::-1] if swapped else stored)


def _jpeg_class() -> type:
    from PIL import JpegImagePlugin

    return JpegImagePlugin.JpegImageFile


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable: a broken EXIF block does not spoil the picture)."""
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - EXIF is a TIFF structure inside the file: parsing it may raise anything
        return 1
    return value if isinstance(value, int) else 1


def _reduce_to_rgb(image: Image.Image, reduce_to: tuple[int, int]) -> Image.Image:
    """RGB, shrunk by whole factors per axis while staying >= reduce_to (H, W), converted strip by strip."""
    width, height = image.size
    factor_x, factor_y = max(1, width // reduce_to[1]), max(1, height // reduce_to[0])
    if factor_x == factor_y == 1:
        return _to_rgb(image)
    top = _sixteen_bit_top(image)
    out = Image.new("RGB", (-(-width // factor_x), -(-height // factor_y)))
    rows = max(1, _STRIP_PIXELS // (width * factor_y)) * factor_y  # a multiple of factor_y: blocks never split
    for y in range(0, height, rows):
        strip = _to_rgb(image.crop((0, y, width, min(height, y + rows))), top)
        out.paste(strip.reduce((factor_x, factor_y)), (0, y // factor_y))
    return out


def _sixteen_bit_top(image: Image.Image) -> float | None:
    """The largest value of a 16-bit/float grayscale picture (strips are scaled by the whole picture's range)."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return None
    return float(image.getextrema()[1]) if image.width and image.height else 0.0  # type: ignore[index]


def _to_rgb(image: Image.Image, top: float | None = None) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float grayscale (some PNG/TIFF): scale to 8 bits by the real range instead of clipping at 255.
        values = np.asarray(image, dtype=np.float32)
        if top is None:
            top = float(values.max()) if values.size else 0.0
        scaled = values * (255.0 / top) if top > 255.0 else values
        image = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Product photos sit on white; transparent pixels often hold black, which would dominate the features.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    # np.array copies: np.asarray on a PIL image is read-only and torch would warn about it.
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
