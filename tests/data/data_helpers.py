"""Small dataset writers for the data tests: one image with hand-made masks or annotations."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image


def textured_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 noise, so that any misplaced pixel shows."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def square_mask(h: int, w: int) -> np.ndarray:
    """(H, W) bool: an off-centre rectangle (asymmetric, so flips and rotations differ)."""
    mask = np.zeros((h, w), bool)
    mask[1 : h // 2, 2 : (3 * w) // 4] = True
    return mask


def write_folder(root: Path, images: dict[str, tuple[Any, list[Image.Image]]]) -> Path:
    """ROOT/image/<stem>.png + ROOT/mask/<stem>/<k>.png from {stem: (image, [mask image])}.

    ``image`` is an (H, W, 3) array (saved as PNG) or JPEG bytes (saved as ``<stem>.jpg``).
    """
    (root / "image").mkdir(parents=True)
    for stem, (image, masks) in images.items():
        if isinstance(image, np.ndarray):
            Image.fromarray(image).save(root / "image" / f"{stem}.png")
        else:
            (root / "image" / f"{stem}.jpg").write_bytes(image)
        folder = root / "mask" / stem
        folder.mkdir(parents=True)
        for k, mask in enumerate(masks):
            mask.save(folder / f"{k}.png")
    return root


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (grey for (H, W), RGB for (H, W, 3)) written by hand: PIL cannot write
    16-bit colour, and the grey writer is tested against it too."""
    h, w = values.shape[:2]
    color_type = 0 if values.ndim == 2 else 2
    rows = values.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def jpeg_with_orientation(image: np.ndarray, orientation: int) -> bytes:
    """JPEG bytes of ``image`` whose EXIF orientation tag is ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def rle_of(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE (counts as str) of an (H, W) bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode()}


def write_sa1b(root: Path, stem: str, image_bytes: bytes, annotations: list[dict]) -> Path:
    """ROOT/<stem>.jpg + ROOT/<stem>.json with ``annotations`` (segmentation dicts given)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{stem}.jpg").write_bytes(image_bytes)
    doc = {
        "image": {"image_id": 1, "file_name": f"{stem}.jpg"},
        "annotations": [
            {"id": k, "segmentation": seg, "area": 0, "bbox": [0, 0, 0, 0]}
            for k, seg in enumerate(annotations)
        ],
    }
    (root / f"{stem}.json").write_text(json.dumps(doc))
    return root


def write_coco(root: Path, images: list[tuple[str, bytes, tuple[int, int]]], anns: list[dict]):
    """ROOT/images/<file> + ROOT/annotations/instances.json; ``anns`` are full annotations."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries = []
    for k, (name, data, (h, w)) in enumerate(images, start=1):
        (root / "images" / name).write_bytes(data)
        entries.append({"id": k, "file_name": name, "height": h, "width": w})
    doc = {"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    path = root / "annotations" / "instances.json"
    path.write_text(json.dumps(doc))
    return path
