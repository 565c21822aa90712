"""Data-path costs at SA-1B scale (1500 x 2250 images, 100-300 masks), measured side by side:
masks_to_lowres (exact area coverage, numpy prefix sums, chunked) against the bilinear
interpolate + 4x4 pool it replaced; on a GPU too when there is one; and the sa1b reader's
open-time scan, image decode and mask decode.

    python bench/data_lowres.py [--masks 300] [--images 20] [--threads N] [--no-gpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from PIL import Image

from maskteacher.data import masks_to_lowres, open_dataset
from maskteacher.data.transforms import input_size

HW, SIZE = (1500, 2250), 1024


def blobs(rng: np.random.Generator, m: int, hw: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]]
    masks = np.zeros((m, *hw), bool)
    for k in range(m):
        cy, cx = rng.uniform(0, hw[0]), rng.uniform(0, hw[1])
        ry, rx = rng.uniform(20, 400, size=2)
        masks[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def bilinear_lowres(masks: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """The approach replaced: float masks, bilinear antialiased resize, pad, 4x4 average."""
    h_in, w_in = input_size(HW, SIZE)
    out = []
    for start in range(0, masks.shape[0], chunk):
        x = masks[start : start + chunk, None].float()
        x = F.interpolate(
            x, size=(h_in, w_in), mode="bilinear", align_corners=False, antialias=True
        )
        x = F.pad(x, (0, SIZE - w_in, 0, SIZE - h_in))
        out.append(F.avg_pool2d(x, 4)[:, 0] >= 0.5)
    return torch.cat(out)


def timed(fn, repeat: int = 3, sync=None):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_sa1b(root: Path, images: int, masks: np.ndarray) -> None:
    h, w = masks.shape[1:]
    img = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    anns = []
    for k, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        anns.append(
            {
                "id": k,
                "segmentation": rle,
                "area": int(m.sum()),
                "bbox": [0, 0, 1, 1],
                "predicted_iou": 0.9,
                "stability_score": 0.9,
                "point_coords": [[1.0, 1.0]],
                "crop_box": [0, 0, w, h],
            }
        )
    Image.fromarray(img).save(root / "sa_0.jpg", quality=90)
    info = {"image_id": 0, "width": w, "height": h, "file_name": "sa_0.jpg"}
    text = json.dumps({"image": info, "annotations": anns})
    for i in range(images):
        if i:
            (root / f"sa_{i}.jpg").write_bytes((root / "sa_0.jpg").read_bytes())
        (root / f"sa_{i}.json").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--masks", type=int, default=300)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-gpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.masks
    masks = blobs(np.random.default_rng(0), n, HW)
    print(
        f"{n} masks at {HW[0]}x{HW[1]} -> low-res {SIZE // 4}; torch threads {torch.get_num_threads()}"
    )

    base = rss_mb()
    t_area, area = timed(lambda: masks_to_lowres(masks, HW, SIZE))
    grow = rss_mb() - base
    t_bil, bil = timed(lambda: bilinear_lowres(torch.from_numpy(masks)), repeat=1)
    agree = (area == bil).float().mean().item()
    print(
        f"CPU area (masks_to_lowres): {t_area / n * 1e3:7.2f} ms/mask  (peak RSS growth {grow:.0f} MB)"
    )
    print(f"CPU bilinear+pool (old):    {t_bil / n * 1e3:7.2f} ms/mask")
    print(f"  ratio old/new {t_bil / t_area:.1f}x; low-res pixels agreeing {agree * 100:.3f}%")

    if torch.cuda.is_available() and not args.no_gpu:
        dev = torch.device("cuda")
        sync = torch.cuda.synchronize
        on_gpu = torch.from_numpy(masks).to(dev)
        timed(lambda: masks_to_lowres(on_gpu, HW, SIZE), repeat=1, sync=sync)  # warm-up
        t_ga, ga = timed(lambda: masks_to_lowres(on_gpu, HW, SIZE), sync=sync)
        timed(lambda: bilinear_lowres(on_gpu, chunk=64), repeat=1, sync=sync)
        t_gb, _ = timed(lambda: bilinear_lowres(on_gpu, chunk=64), sync=sync)
        t_copy, _ = timed(lambda: torch.from_numpy(masks).to(dev), sync=sync)
        print(
            f"GPU area (masks_to_lowres): {t_ga / n * 1e3:7.3f} ms/mask; bilinear {t_gb / n * 1e3:.3f}"
            f" ms/mask; host->GPU copy {t_copy / n * 1e3:.3f} ms/mask; "
            f"GPU == CPU result: {torch.equal(ga.cpu(), area)}"
        )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_sa1b(root, args.images, masks[:100])
        kb = (root / "sa_0.json").stat().st_size / 1024
        t_open, ds = timed(lambda: open_dataset(root, "sa1b"), repeat=2)
        t_img, _ = timed(lambda: ds[0])
        t_dec, decoded = timed(lambda: ds[0].masks)
        t_copy, c_order = timed(lambda: np.ascontiguousarray(decoded))
        t_low, low_f = timed(lambda: masks_to_lowres(decoded, HW, SIZE))
        t_low_c, low_c = timed(lambda: masks_to_lowres(c_order, HW, SIZE))
        assert torch.equal(low_f, low_c)
        per = t_open / args.images
        print(
            f"sa1b, {len(masks[:100])} masks/image (JSON {kb:.0f} kB): open scan {per * 1e3:.1f} ms/image; "
            f"image decode {t_img * 1e3:.1f} ms"
        )
        print(
            f"  mask decode {t_dec * 1e3:.0f} ms (zero-copy column-major view); re-laying out to "
            f"C order would add {t_copy * 1e3:.0f} ms ({(t_dec + t_copy) / t_dec:.2f}x)"
        )
        print(
            f"  to low-res: {t_low * 1e3:.0f} ms from the view, {t_low_c * 1e3:.0f} ms from C order"
        )
        print(
            f"  open scan is {per / (t_img + t_dec) * 100:.2f}% of decoding the image + masks; "
            f"one SA-1B tar (11,186 images): {per * 11186:.0f} s"
        )


if __name__ == "__main__":
    main()
