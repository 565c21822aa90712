"""Image files: header (size + EXIF orientation) without decoding, and decoding to 8-bit RGB.

Which pixel grid annotations refer to
-------------------------------------
Annotations (COCO polygons / RLEs, SA-1B RLEs, folder mask PNGs) are read on the image file's
**stored pixel grid**; an EXIF orientation tag is never applied, in any reader, in ``eval``, in the
training pictures or in ``cache view`` (all of them decode images with :func:`read_image`).
That is the COCO convention: pycocotools rasterises annotations at the ``height`` / ``width``
the JSON records and never opens the image, and torchvision's ``CocoDetection`` decodes with
``PIL.Image.open(...).convert("RGB")``, which ignores the tag. Other tools differ: OpenCV's
``cv2.imread`` (segment-anything's ``scripts/amg.py``, detectron2's ``read_image``) and most
annotation tools and viewers show the rotated view, so annotations drawn there refer to the
rotated grid. Nothing in a file says which grid its annotations used, so:

- an image whose orientation tag is not 1 is counted (``data stats``: ``exif_oriented_images``)
  and the dataset logs one warning naming the first such file;
- when the recorded annotation size is the *transposed* image size and the tag is a 90-degree
  one (5-8), the mismatch message says the annotations were made on the rotated view and how
  to fix the file (rotate the pixels and drop the tag, e.g. ``exiftran -ai FILE``).
A square image tagged 90 degrees, or one tagged 180 degrees or mirrored, cannot be told apart
from its annotations; only the warning is left for those.

Bit depth: 16-bit grey PNGs (PIL mode ``I;16``) are scaled to 8 bits (``value >> 8``, the same
as PIL does for 16-bit colour PNGs), not clipped at 255.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from maskteacher.data._io import BadItem
from maskteacher.errors import UserError

log = logging.getLogger("maskteacher.data")

# What PIL raises on unreadable, truncated or malformed files (PNG ``verify`` raises SyntaxError;
# zlib / struct errors of damaged chunks surface as these, and MemoryError for absurd headers).
PIL_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    MemoryError,
    Image.DecompressionBombError,
)
EXIF_ORIENTATION = 0x0112
ORIENTATION_NAMES = {
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "mirrored and rotated 90 degrees",
    6: "rotated 90 degrees clockwise",
    7: "mirrored and rotated 270 degrees",
    8: "rotated 90 degrees counter-clockwise",
}
# Orientations that swap width and height when applied.
TRANSPOSING = frozenset({5, 6, 7, 8})
# PIL modes of 16-bit single-channel images (PNG bit depth 16); "I" is their 32-bit container.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def orientation_of(im: Image.Image) -> int:
    """The EXIF orientation tag of an open image: 1..8, 1 when absent or unreadable."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 -- a damaged EXIF block is metadata, not pixels
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def image_header(path: Path) -> tuple[tuple[int, int], int]:
    """((H, W), EXIF orientation) of an image file from its header, without decoding pixels.

    Raises BadItem (kind ``image``) when the file is missing or is not an image PIL can read.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            return (height, width), orientation_of(im)
    except FileNotFoundError:
        raise BadItem(path, "image file not found", kind="image") from None
    except PIL_ERRORS as exc:
        raise BadItem(path, f"not a readable image ({exc})", kind="image") from None


def to_rgb8(im: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a PIL image on its stored grid (16-bit grey scaled, alpha dropped)."""
    if im.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(im).astype(np.int64)
        grey8 = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB on its stored pixel grid (module docstring).

    Grey, grey+alpha, RGBA, palette, CMYK, 16-bit... are converted to 8-bit RGB. Raises
    UserError naming the file when it is missing or does not decode.
    """
    try:
        with Image.open(path) as im:
            return to_rgb8(im)
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found") from None
    except PIL_ERRORS as exc:
        raise UserError(
            f"{path}: cannot decode image ({type(exc).__name__}: {exc}); expected a readable "
            "JPEG/PNG"
        ) from None


def size_mismatch(
    what: str, their_hw: tuple[int, int], image_hw: tuple[int, int], orientation: int
) -> str:
    """Reason text for an annotation size that differs from the image's stored size.

    When the sizes are transposed and the image has a 90-degree EXIF tag, the text says that
    the annotations were made on the rotated view and how to fix the image file.
    """
    text = (
        f"{what} is {their_hw[0]}x{their_hw[1]} (HxW) but the image file is "
        f"{image_hw[0]}x{image_hw[1]}; expected equal"
    )
    if tuple(their_hw) == tuple(image_hw[::-1]) and orientation in TRANSPOSING:
        text += (
            f" (the image's EXIF orientation {orientation}, {ORIENTATION_NAMES[orientation]}, "
            "was applied when these annotations were made; maskteacher reads annotations on the "
            "stored pixel grid like pycocotools: rotate the pixels and drop the tag, e.g. "
            "exiftran -ai FILE)"
        )
    return text


def warn_oriented(root: Path, oriented: list[tuple[Path, int]], total: int) -> None:
    """One warning per dataset open when images carry a non-identity EXIF orientation."""
    if not oriented:
        return
    path, orientation = oriented[0]
    log.warning(
        "%d of %d images in %s carry an EXIF orientation tag (first: %s, orientation %d = %s); "
        "maskteacher ignores the tag and reads images and annotations on the stored pixel grid "
        "(as pycocotools / torchvision do). If the annotations were drawn on the rotated view "
        "they are misaligned: rotate the pixels and drop the tag (e.g. exiftran -ai FILE)",
        len(oriented),
        total,
        root,
        path,
        orientation,
        ORIENTATION_NAMES[orientation],
    )
