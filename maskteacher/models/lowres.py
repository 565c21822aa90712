"""Low-res frame helpers: the valid region, boxes to the original frame, masks back to it.

The low-res frame is the mask decoder's output (L = image_size / 4). Low-res pixels outside the
image -- beyond ``lowres_valid_hw(input_hw) = (ceil(h_in / 4), ceil(w_in / 4))``, i.e. blocks
made only of padding -- are not part of the image (:func:`valid_lowres_mask`).

Box mapping (:func:`lowres_boxes_to_original`): a low-res box spanning rows ``r0..r1`` and
columns ``c0..c1`` (inclusive, as ``batched_mask_to_box`` reports them) covers input-frame pixels
``[4 c0, 4 c1 + 4) x [4 r0, 4 r1 + 4)``; with ``sx = W / w_in`` and ``sy = H / h_in`` it maps to
the original-frame box ``(4 c0 sx, 4 r0 sy, min(4 (c1 + 1) sx, W), min(4 (r1 + 1) sy, H))``.
Boxes are XYXY in pixel-edge coordinates: a mask covering the whole image has box
``(0, 0, W, H)`` (segment-anything's ``batched_mask_to_box`` reports the last pixel's index
instead, i.e. one pixel less on x1 / y1). An empty mask has box ``(0, 0, 0, 0)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def valid_lowres_mask(input_hw: torch.Tensor, low_res: int) -> torch.Tensor:
    """(B, L, L) bool: low-res pixels that touch the image (rows < ceil(h/4), cols < ceil(w/4))."""
    valid = torch.div(input_hw + 3, 4, rounding_mode="floor")  # ceil(hw / 4)
    coords = torch.arange(low_res, device=input_hw.device)
    rows = coords[None, :] < valid[:, 0:1]
    cols = coords[None, :] < valid[:, 1:2]
    return rows[:, :, None] & cols[:, None, :]


def lowres_boxes_to_original(
    boxes: torch.Tensor, input_hw: torch.Tensor, orig_hw: torch.Tensor
) -> torch.Tensor:
    """(K, 4) inclusive low-res XYXY indices -> (K, 4) float32 original-frame pixel-edge XYXY.

    input_hw / orig_hw: (K, 2) per box (the box's image). Empty boxes (all zero, as
    ``batched_mask_to_box`` reports an empty mask) stay (0, 0, 0, 0). See the module docstring.
    """
    in_hw = input_hw.to(torch.float32)
    og_hw = orig_hw.to(torch.float32)
    scale_x = 4.0 * og_hw[:, 1] / in_hw[:, 1]
    scale_y = 4.0 * og_hw[:, 0] / in_hw[:, 0]
    out = torch.stack(
        [
            boxes[:, 0] * scale_x,
            boxes[:, 1] * scale_y,
            torch.minimum((boxes[:, 2] + 1) * scale_x, og_hw[:, 1]),
            torch.minimum((boxes[:, 3] + 1) * scale_y, og_hw[:, 0]),
        ],
        dim=1,
    )
    empty = (boxes == 0).all(dim=1, keepdim=True)
    return torch.where(empty, torch.zeros_like(out), out)


def lowres_to_masks(
    logits: torch.Tensor,
    *,
    image_size: int,
    input_hw: Sequence[int],
    orig_hw: Sequence[int],
    threshold: float = 0.0,
    chunk: int = 16,
) -> torch.Tensor:
    """(N, L, L) low-res logits of one image -> (N, H, W) bool masks in the original frame.

    segment-anything's ``Sam.postprocess_masks``: bilinear to ``image_size`` square, crop the
    unpadded ``input_hw``, bilinear to ``orig_hw``, then ``> threshold``. For evaluation,
    agreement checks and pictures; done in chunks of ``chunk`` masks to bound memory.
    """
    h_in, w_in = (int(v) for v in input_hw)
    h, w = (int(v) for v in orig_hw)
    out = torch.zeros((logits.shape[0], h, w), dtype=torch.bool, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        x = logits[start : start + chunk, None].float()
        x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
        x = F.interpolate(x[..., :h_in, :w_in], (h, w), mode="bilinear", align_corners=False)
        out[start : start + chunk] = x[:, 0] > threshold
    return out
