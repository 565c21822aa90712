"""``folder`` format, the origin project's layout::

    ROOT/image/<stem>.jpg | .jpeg | .png      one file per image (suffix case-insensitive)
    ROOT/mask/<stem>/<k>.png                  one PNG per object, foreground = value > 127
                                              (0/1, palette and RGB masks: see data.masks)

Image ids are the stems, sorted. Masks of an image are ordered by file name with digit runs
compared as numbers (``2.png`` before ``10.png``). A missing ``ROOT/mask/<stem>/`` folder or one
with no PNGs means the image has zero objects (valid). Files with other suffixes and hidden
files (names starting with '.') are ignored.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from pathlib import Path

from maskteacher.data._io import (
    IMAGE_SUFFIXES,
    BadItem,
    BadItemLog,
    natural_key,
    progress,
    visible_files,
)
from maskteacher.data.dataset import BaseDataset, Item
from maskteacher.data.fingerprint import combine
from maskteacher.data.images import image_header
from maskteacher.data.masks import (
    check_mask_file,
    decode_mask,
    load_masks,
    mask_summary,
    warn_inferred,
)
from maskteacher.errors import UserError


def _mask_files(mask_dir: Path) -> list[Path]:
    if not mask_dir.is_dir():
        return []
    files = visible_files(mask_dir, (".png",))
    return sorted(files, key=lambda p: natural_key(p.name))


def _scan_item(image_id: str, image_path: Path, mask_root: Path) -> Item:
    hw, orientation = image_header(image_path)
    mask_paths = tuple(_mask_files(mask_root / image_id))
    digests = [(path.name, check_mask_file(path, hw, orientation)) for path in mask_paths]
    return Item(
        image_id=image_id,
        image_path=image_path,
        hw=hw,
        num_masks=len(mask_paths),
        mask_loader=functools.partial(load_masks, mask_paths, hw, str(mask_root)),
        summary_loader=functools.partial(mask_summary, mask_paths, hw),
        annotation_digest=combine(digests),
        orientation=orientation,
    )


class FolderDataset(BaseDataset):
    """Reader for ``ROOT/image`` + ``ROOT/mask`` (see the module docstring)."""

    format = "folder"

    @classmethod
    def open(cls, root: Path, *, skip_bad: bool = False) -> FolderDataset:
        image_dir, mask_root = root / "image", root / "mask"
        if not image_dir.is_dir():
            raise UserError(f"{root}: no image/ folder; expected ROOT/image/<stem>.jpg|png")
        if not mask_root.is_dir():
            raise UserError(f"{root}: no mask/ folder; expected ROOT/mask/<stem>/<k>.png")
        by_stem: dict[str, list[Path]] = defaultdict(list)
        for path in visible_files(image_dir, IMAGE_SUFFIXES):
            by_stem[path.stem].append(path)
        bad = BadItemLog(skip_bad=skip_bad)
        items: list[Item] = []
        stems = sorted(by_stem)
        for stem in progress(stems, total=len(stems), desc=f"checking {root.name}"):
            paths = sorted(by_stem[stem])
            try:
                if len(paths) > 1:
                    names = ", ".join(p.name for p in paths)
                    raise BadItem(
                        image_dir / stem,
                        f"several images share the stem ({names}); expected one",
                        kind="image",
                    )
                items.append(_scan_item(stem, paths[0], mask_root))
            except BadItem as exc:
                bad.handle(exc)
        _probe_mask_rule(items, mask_root)
        return cls(root, items, bad)


def _probe_mask_rule(items: list[Item], mask_root: Path) -> None:
    """Decode the dataset's first mask so that an inferred rule is warned about at open time
    (one decode; the other masks are checked when they are read)."""
    first = next((item for item in items if item.num_masks), None)
    if first is None:
        return
    path = _mask_files(mask_root / first.image_id)[0]
    try:
        _, inferred = decode_mask(path, first.hw)
    except UserError:  # reported when the masks are read
        return
    if inferred is not None:
        warn_inferred(str(mask_root), path, inferred)
