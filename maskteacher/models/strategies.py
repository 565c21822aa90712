"""Which grid prompts the everything-mode generator decodes: all of them, or hierarchically.

- ``grid``: every prompt, in chunks of ``points_per_batch`` (SamAutomaticMaskGenerator's way);
- ``hierarchical`` (after TinySAM's hierarchical segment-everything): first a sparse grid --
  every ``stride``-th row and column of the ``points_per_side`` grid, starting at
  ``stride // 2`` (1/16 of the prompts at stride 4) -- then the other grid points, except those
  inside a confident mask of the first pass: a mask the first pass kept (it passed the
  predicted-IoU and stability filters) whose logit at the point's low-res pixel is above
  ``logit_thresh`` (TinySAM's 8.5). Both passes' candidates then go through box NMS together.
  A region a confident mask covers is not prompted again, so its smaller parts found only by
  dense prompts inside it can be missing; ``bench/precompute.py --strategies`` reports the
  prompts decoded, the time and the agreement with the full grid.

:data:`STRATEGIES` maps ``precompute.strategy`` to the function. Each takes ``run(points,
image) -> Kept`` (decode + filter one chunk) and the batch's prompts, and returns the kept
candidates of every chunk and the number of prompts decoded per image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from maskteacher.models.filtering import Kept

Run = Callable[[torch.Tensor, torch.Tensor], Kept]


def chunks(
    points: torch.Tensor, image: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(P, 2) points and (P,) image indices in chunks of ``size`` prompts."""
    for start in range(0, points.shape[0], size):
        yield points[start : start + size], image[start : start + size]


def _count(image: torch.Tensor, num_images: int) -> list[int]:
    return torch.bincount(image, minlength=num_images).tolist()


def grid(
    run: Run, points: torch.Tensor, image: torch.Tensor, *, num_images: int, points_per_batch: int,
    **_: object,
) -> tuple[list[Kept], list[int]]:  # fmt: skip
    """Every prompt."""
    kept = [run(p, i) for p, i in chunks(points, image, points_per_batch)]
    return kept, _count(image, num_images)


def sparse_grid(points_per_side: int, stride: int) -> torch.Tensor:
    """(n * n,) bool: the grid points (row-major, x fastest) of the sparse first pass."""
    index = torch.arange(points_per_side)
    on = index % stride == stride // 2
    return (on[:, None] & on[None, :]).flatten()


def coverage(kept: list[Kept], num_images: int, logit_thresh: float) -> torch.Tensor | None:
    """(B, L, L) bool: pixels where a kept mask's logit is above ``logit_thresh`` (None when
    nothing was kept)."""
    rows = [k for k in kept if k.logits.shape[0]]
    if not rows:
        return None
    logits = torch.cat([k.logits for k in rows])
    image = torch.cat([k.image for k in rows])
    confident = (logits > logit_thresh).flatten(1).float()  # (K, L * L)
    counts = torch.zeros(num_images, confident.shape[1], device=logits.device)
    counts.index_add_(0, image, confident)  # confident masks per pixel
    return (counts > 0).reshape(num_images, *logits.shape[-2:])


def hierarchical(
    run: Run,
    points: torch.Tensor,
    image: torch.Tensor,
    *,
    num_images: int,
    points_per_batch: int,
    points_per_side: int,
    stride: int,
    logit_thresh: float,
) -> tuple[list[Kept], list[int]]:
    """The sparse grid, then the uncovered rest of the grid (module docstring). points / image:
    the batch's grid prompts, ``points_per_side`` squared per image, image by image."""
    per_image = points_per_side**2
    if points.shape[0] != per_image * num_images:
        raise ValueError("the hierarchical strategy needs the points_per_side grid of each image")
    sparse = sparse_grid(points_per_side, stride).to(points.device).repeat(num_images)
    first = [run(p, i) for p, i in chunks(points[sparse], image[sparse], points_per_batch)]
    rest = ~sparse
    cover = coverage(first, num_images, logit_thresh)
    if cover is not None:
        low_res = cover.shape[-1]
        pixel = (points / 4).floor().long().clamp(0, low_res - 1)  # (P, 2) (col, row)
        rest &= ~cover[image, pixel[:, 1], pixel[:, 0]]
    second = [run(p, i) for p, i in chunks(points[rest], image[rest], points_per_batch)]
    return first + second, _count(image[sparse | rest], num_images)


#: ``precompute.strategy`` -> the prompt strategy.
STRATEGIES: dict[str, Callable[..., tuple[list[Kept], list[int]]]] = {
    "grid": grid,
    "hierarchical": hierarchical,
}
