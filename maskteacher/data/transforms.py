"""Frame transforms (DESIGN.md "Frames").

- original frame: the image file's (H, W);
- model input frame: longest side resized to ``image_size`` -> (h_in, w_in), then zero-padded
  bottom/right to ``image_size`` x ``image_size``. Points are (x, y) in this frame, pixel centres
  at ``i + 0.5`` like segment-anything;
- low-res frame: ``L = image_size // 4`` square, the mask decoder's output. One low-res pixel is a
  4 x 4 block of the padded input frame; the blocks that touch the image are the top-left
  ``lowres_valid_hw(input_hw) = (ceil(h_in / 4), ceil(w_in / 4))`` ones.

Resizing and the point grid call segment-anything's own ``ResizeLongestSide`` and
``build_point_grid`` so our inputs equal what ``SamAutomaticMaskGenerator`` computes.

Horizontal flip (training augmentation) is a flip of the *unpadded* input-frame image, so the
padding stays bottom/right:

- ``hflip_input``: input columns ``[0, w_in)`` reversed;
- ``hflip_points``: ``x -> w_in - x`` (pixel centre ``c + 0.5`` goes to ``(w_in - 1 - c) + 0.5``);
- ``hflip_lowres``: low-res columns ``[0, Wv)`` reversed, ``Wv = ceil(w_in / 4)``.

The three agree exactly when ``w_in % 4 == 0`` (``masks_to_lowres`` of the flipped masks equals
``hflip_lowres`` of ``masks_to_lowres``). Otherwise the last valid low-res column is partly
padding, and reversing whole columns moves mask content ``p = 4 * Wv - w_in`` input pixels
(``p / 4`` < 1 low-res pixel) to the right of where a recomputation would put it. That is the
price of flipping cached low-res targets (teacher logits exist only in that frame) without
resampling them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import build_point_grid
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.transforms.functional import resize, to_pil_image

# Roughly the most bytes of intermediates masks_to_lowres holds at once (one chunk of masks).
_LOWRES_CHUNK_BYTES = 256 * 2**20
# "At least half covered", with room for float32 rounding (exact ties count as covered).
_HALF = 0.5 - 1e-6


def input_size(orig_hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(h_in, w_in): the unpadded model-input size, longest side = ``image_size``.

    Same rounding as segment-anything (``ResizeLongestSide.get_preprocess_shape``), except that
    no side is rounded down to 0: a degenerate image (say 1 x 400 at image_size 64, whose short
    side scales to 0.16 px) keeps a 1-pixel side instead of crashing the resize. Its low-res
    ground truth is then mostly padding (see ``masks_to_lowres``), like any thin strip.
    """
    h_in, w_in = ResizeLongestSide.get_preprocess_shape(
        int(orig_hw[0]), int(orig_hw[1]), image_size
    )
    return max(1, h_in), max(1, w_in)


def lowres_size(image_size: int) -> int:
    """Side L of the square low-res frame: ``image_size // 4``."""
    if image_size % 4:
        raise ValueError(f"image_size {image_size} is not a multiple of 4")
    return image_size // 4


def lowres_valid_hw(input_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of the low-res blocks that touch the image: ``ceil(h_in/4), ceil(w_in/4)``."""
    return math.ceil(input_hw[0] / 4), math.ceil(input_hw[1] / 4)


def resize_image(image: np.ndarray, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize an (H, W, 3) uint8 RGB image to the unpadded model input frame.

    Returns ((h_in, w_in, 3) uint8, (h_in, w_in)). Makes the calls of
    ``ResizeLongestSide.apply_image`` (torchvision's PIL ``resize``) at :func:`input_size`, so
    the pixels equal SamPredictor's / SamAutomaticMaskGenerator's preprocessing bit for bit
    (degenerate sizes aside, which crash there).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    target = input_size(image.shape[:2], image_size)
    resized = np.array(resize(to_pil_image(image), target))
    return resized, (int(resized.shape[0]), int(resized.shape[1]))


def to_model_input(image: np.ndarray, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, S, S) uint8 tensor: resized like :func:`resize_image`, zero-padded bottom/right.

    Returns the tensor and (h_in, w_in). Normalisation is left to the model (on the device),
    which sets the padding to 0 after normalising as ``Sam.preprocess`` does.
    """
    resized, (h_in, w_in) = resize_image(image, image_size)
    out = torch.zeros((3, image_size, image_size), dtype=torch.uint8)
    out[:, :h_in, :w_in] = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    return out, (h_in, w_in)


def _block_bounds(n_orig: int, n_in: int, side: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Where the low-res blocks of one axis start, in original-frame pixel units.

    Block j covers input-frame [4j, 4j + 4), i.e. original [4j * s, (4j + 4) * s) with
    s = n_orig / n_in, clipped to the image [0, n_orig] (beyond is padding). Returns (i, f, width):
    the boundaries b_j = i_j + f_j (j = 0..side) split into integer and fractional parts, and the
    block width 4 * s.
    """
    scale = n_orig / n_in
    bounds = np.minimum(np.arange(side + 1, dtype=np.float64) * 4 * scale, n_orig)
    whole = np.floor(bounds).astype(np.int64)
    return whole, bounds - whole, 4 * scale


def _integrate_rows_numpy(x: np.ndarray, whole: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """(c, H, W) uint8 0/1 -> (c, side, W) float32 sums over original rows [b_j, b_j+1).

    The mask is constant on each pixel, so the integral up to b = i + f is prefix(i) + f * x[i].
    Whole rows are summed in integers, one vectorised ``sum`` per block (``np.add.reduceat``
    is several times slower along a middle axis), so no float copy of the masks is made.
    """
    c, n, width = x.shape
    side = len(whole) - 1
    longest = int(np.diff(whole).max(initial=0))
    acc = np.uint16 if longest < 2**16 else np.int64
    sums = np.zeros((c, side, width), dtype=acc)
    for j in range(side):
        lo, hi = whole[j], whole[j + 1]
        if hi > lo:
            np.sum(x[:, lo:hi], axis=1, dtype=acc, out=sums[:, j])
    out = sums.astype(np.float32)
    edge = x[:, np.minimum(whole, n - 1)].astype(np.float32)
    edge *= frac.astype(np.float32)[None, :, None]  # frac is 0 where whole == n
    out += edge[:, 1:]
    out -= edge[:, :-1]
    return out


def _overlap_matrix(n_orig: int, n_in: int, side: int) -> np.ndarray:
    """(side, n_orig) float32: length of original pixel r inside block j (see _block_bounds)."""
    whole, frac, _ = _block_bounds(n_orig, n_in, side)
    bounds = whole + frac
    pixel = np.arange(n_orig, dtype=np.float64)
    lo = np.maximum(bounds[:-1, None], pixel[None, :])
    hi = np.minimum(bounds[1:, None], pixel[None, :] + 1)
    return np.clip(hi - lo, 0, None).astype(np.float32)


def _integrate_last(x: torch.Tensor, whole: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., side) float64 sums over [b_j, b_j+1) along the last axis (prefix sums)."""
    n = x.shape[-1]
    prefix = F.pad(torch.cumsum(x, -1, dtype=torch.float64), (1, 0))
    at = prefix[..., whole] + frac * x[..., whole.clamp(max=n - 1)].to(torch.float64)
    return at[..., 1:] - at[..., :-1]


def _coverage_numpy(x: np.ndarray, rows: tuple, other: np.ndarray, norm: float) -> np.ndarray:
    """(c, A, B) uint8 0/1 -> (c, L, L) float32 covered fraction of each low-res pixel.

    Axis A (bounds ``rows``) is integrated exactly in integers; the 4-6x smaller result is then
    reduced along B by one BLAS product with the (L, B) overlap matrix ``other``.
    """
    by_rows = _integrate_rows_numpy(x, rows[0], rows[1])  # (c, L, B)
    c, side, width = by_rows.shape
    out = by_rows.reshape(c * side, width) @ other.T  # 2-D: one BLAS call (batched matmul is not)
    out /= np.float32(norm)
    return out.reshape(c, side, side)


def _coverage_cpu(x: np.ndarray, input_hw: tuple[int, int], rows: tuple, cols: tuple) -> np.ndarray:
    """(c, H, W) uint8 0/1 -> (c, L, L) float32 coverage, integrating first along whichever of
    H and W is not the contiguous axis in memory (so the line sums are vectorised adds).
    Column-major masks (pycocotools' decode) are handled as their (c, W, H) transpose."""
    _, h, w = x.shape
    side = len(rows[0]) - 1
    norm = rows[2] * cols[2]
    if x.strides[1] < x.strides[2]:
        ay = _overlap_matrix(h, input_hw[0], side)
        cover = _coverage_numpy(x.transpose(0, 2, 1), cols, ay, norm).transpose(0, 2, 1)
        return np.ascontiguousarray(cover)
    return _coverage_numpy(x, rows, _overlap_matrix(w, input_hw[1], side), norm)


def _coverage_torch(x: torch.Tensor, rows: tuple, cols: tuple) -> torch.Tensor:
    """Same as _coverage_numpy with torch prefix sums, on the tensor's device (for GPUs)."""
    dev = x.device
    r_whole, r_frac = torch.from_numpy(rows[0]).to(dev), torch.from_numpy(rows[1]).to(dev)
    c_whole, c_frac = torch.from_numpy(cols[0]).to(dev), torch.from_numpy(cols[1]).to(dev)
    by_rows = _integrate_last(x.transpose(1, 2), r_whole, r_frac)  # (c, W, L)
    out = _integrate_last(by_rows.transpose(1, 2), c_whole, c_frac)  # (c, L, L)
    return out / (rows[2] * cols[2])


def masks_to_lowres(
    masks: np.ndarray | torch.Tensor, orig_hw: tuple[int, int], image_size: int
) -> torch.Tensor:
    """(M, H, W) bool original-frame masks -> (M, L, L) bool low-res frame, L = image_size // 4.

    A low-res pixel is set when at least half of its area is covered by the mask. Its area is
    the 4 x 4 block of the padded input frame, mapped back to the original frame by the resize
    scale (padding counts as uncovered). This equals resizing the mask to the input frame with
    box (area) resampling, padding to S x S, averaging 4 x 4 blocks and thresholding at 0.5, but
    never builds resized float masks: on the CPU, integer sums of whole lines plus one small
    matrix product with the pixel/block overlap matrix; on a GPU, prefix sums. Masks are
    processed in chunks (memory stays bounded for hundreds of full-size masks); M may be 0.
    Either memory layout (C order, or the column-major view pycocotools decodes to) is fast.
    A numpy array or CPU tensor is processed with numpy; a GPU tensor on its device.
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    if masks.ndim != 3 or tuple(masks.shape[1:]) != (h, w):
        raise ValueError(f"masks shape {tuple(masks.shape)} does not match orig_hw {(h, w)}")
    side = lowres_size(image_size)
    h_in, w_in = input_size((h, w), image_size)
    rows, cols = _block_bounds(h, h_in, side), _block_bounds(w, w_in, side)
    on_gpu = isinstance(masks, torch.Tensor) and masks.device.type != "cpu"
    device = masks.device if on_gpu else torch.device("cpu")
    out = torch.zeros((masks.shape[0], side, side), dtype=torch.bool, device=device)
    per_mask = (8 * (h + 1) * w) if on_gpu else (10 * side * max(h, w))
    chunk = max(1, _LOWRES_CHUNK_BYTES // per_mask)
    for start in range(0, masks.shape[0], chunk):
        part = masks[start : start + chunk]
        if on_gpu:
            cover = _coverage_torch(part, rows, cols)
        else:
            arr = part.numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
            arr = arr.view(np.uint8) if arr.dtype == np.bool_ else (arr != 0).astype(np.uint8)
            cover = torch.from_numpy(_coverage_cpu(arr, (h_in, w_in), rows, cols))
        out[start : start + chunk] = cover >= _HALF
    return out


def point_grid(points_per_side: int, input_hw: tuple[int, int]) -> np.ndarray:
    """(n * n, 2) float32 (x, y) grid over the unpadded image, in the model input frame.

    ``build_point_grid`` (row-major: x varies fastest) scaled by (w_in, h_in): equal (to float
    rounding) to what SamAutomaticMaskGenerator feeds its predictor, which scales by the original
    size and then applies ``ResizeLongestSide.apply_coords``.
    """
    h_in, w_in = input_hw
    return (build_point_grid(points_per_side) * np.array([w_in, h_in], dtype=np.float64)).astype(
        np.float32
    )


def hflip_points(points: np.ndarray | torch.Tensor, input_hw: tuple[int, int]):
    """Mirror (..., 2) (x, y) input-frame points with the unpadded image: x -> w_in - x.

    Returns a new array/tensor of the same type.
    """
    flipped = points.clone() if isinstance(points, torch.Tensor) else np.array(points, copy=True)
    flipped[..., 0] = input_hw[1] - flipped[..., 0]
    return flipped


def hflip_input(image: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """Mirror a (..., C, S, S) padded model-input image: columns [0, w_in) reversed, padding kept."""
    w_in = input_hw[1]
    out = image.clone()
    out[..., :w_in] = image[..., :w_in].flip(-1)
    return out


def hflip_lowres(masks: np.ndarray | torch.Tensor, input_hw: tuple[int, int]):
    """Mirror (..., L, L) low-res masks or logits with the unpadded image.

    Columns [0, ceil(w_in / 4)) are reversed, the rest (padding) is kept; see the module
    docstring for the sub-pixel offset when w_in is not a multiple of 4.
    """
    valid = lowres_valid_hw(input_hw)[1]
    if isinstance(masks, torch.Tensor):
        out = masks.clone()
        out[..., :valid] = masks[..., :valid].flip(-1)
        return out
    out = np.array(masks, copy=True)
    out[..., :valid] = masks[..., :valid][..., ::-1]
    return out
