"""Image decoding: bytes -> uint8 (3, H, W) RGB tensors, safely.

JPEG (nearly all of Cdiscount) goes through libjpeg-turbo via torchvision's decoder op; everything else (PNG, GIF,
WebP, ...) and any JPEG that op cannot handle goes through Pillow. The declared size is read from the header and
checked before any pixel is decoded, so a tiny file that claims to be 100000 x 100000 is refused without allocating.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["ImageDecodeError", "decode_image", "decode_pil", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 40_000_000

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})

# A half-decoded picture padded with grey must raise, never pass as a product photo.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image; `reason` is a short, stable description."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


def decode_image(data: bytes | bytearray | memoryview, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode an encoded image into a uint8 (3, H, W) RGB tensor (HWC-strided, ready for channels_last batches).

    Raises ImageDecodeError: "empty", "truncated JPEG", "not an image", "too many pixels (W x H)", ...
    """
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
        if _DECODE_JPEG is not None and height > 0 and components in (1, 3, 4):
            decoded = _decode_jpeg_turbo(data)
            if decoded is not None:
                return decoded
    return _pil_to_tensor(_decode_with_pillow(data, max_pixels))


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
    return _decode_with_pillow(data, max_pixels)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    png = _png_header(data) if data.startswith(_PNG_MAGIC) else None
    if png is not None:
        _check_pixels(*png, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies just below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"too many pixels (more than {2 * (Image.MAX_IMAGE_PIXELS or 0)})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(f"corrupt image header ({error})") from None
    _check_pixels(image.width, image.height, max_pixels)
    return image


def _decode_with_pillow(data: bytes, max_pixels: int) -> Image.Image:
    image = _open_checked(data, max_pixels)
    kind = image.format or "image"
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except OSError as error:
        if "truncated" in str(error).lower():
            raise ImageDecodeError(f"truncated {kind}") from None
        raise ImageDecodeError(f"corrupt {kind} ({error})") from None
    except (SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"corrupt {kind} ({error})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit/float grayscale (some PNG/TIFF): scale to 8 bits by the real range instead of clipping at 255.
        values = np.asarray(image, dtype=np.float32)
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
