"""Frame transforms: equal to segment-anything's own preprocessing; low-res masks on hand-made
cases; horizontal-flip conventions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.transforms import ResizeLongestSide

from maskteacher.data import transforms
from maskteacher.data.transforms import (
    hflip_input,
    hflip_lowres,
    hflip_points,
    input_size,
    lowres_size,
    lowres_valid_hw,
    masks_to_lowres,
    point_grid,
    resize_image,
    to_model_input,
)


class _Stop(Exception):
    pass


def _sam_generator_inputs(image: np.ndarray, image_size: int, points_per_side: int):
    """Run SamAutomaticMaskGenerator.generate up to its first predictor call and capture the
    resized image and the prompt points it feeds the predictor (no model weights involved)."""
    model = SimpleNamespace(
        image_encoder=SimpleNamespace(img_size=image_size),
        image_format="RGB",
        device=torch.device("cpu"),
    )
    gen = SamAutomaticMaskGenerator(
        model, points_per_side=points_per_side, points_per_batch=points_per_side**2
    )
    captured = {}

    def set_torch_image(image_tensor, original_size):
        captured["image"] = image_tensor
        captured["orig"] = tuple(original_size)

    def predict_torch(point_coords, point_labels, **kwargs):
        captured["points"] = point_coords
        raise _Stop

    gen.predictor.set_torch_image = set_torch_image
    gen.predictor.predict_torch = predict_torch
    with pytest.raises(_Stop):
        gen.generate(image)
    return captured


@pytest.mark.parametrize(("hw", "image_size", "n"), [((150, 97), 64, 16), ((61, 200), 128, 8)])
def test_resize_and_point_grid_equal_sam_automatic_mask_generator(hw, image_size, n):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    captured = _sam_generator_inputs(image, image_size, n)

    resized, input_hw = resize_image(image, image_size)
    assert input_hw == tuple(captured["image"].shape[-2:])
    assert torch.equal(torch.from_numpy(resized).permute(2, 0, 1)[None], captured["image"])

    padded, input_hw2 = to_model_input(image, image_size)
    assert input_hw2 == input_hw and padded.dtype == torch.uint8
    assert padded.shape == (3, image_size, image_size)
    assert torch.equal(padded[:, : input_hw[0], : input_hw[1]], captured["image"][0])
    assert padded[:, input_hw[0] :].sum() == 0 and padded[:, :, input_hw[1] :].sum() == 0

    grid = point_grid(n, input_hw)
    assert grid.dtype == np.float32 and grid.shape == (n * n, 2)
    np.testing.assert_allclose(grid, captured["points"][:, 0].numpy(), rtol=1e-6, atol=1e-4)


def test_input_size_matches_resize_longest_side():
    for h, w in [(1500, 2250), (2250, 1500), (100, 100), (97, 150), (7, 400), (333, 334)]:
        for size in (64, 256, 1024):
            expected = ResizeLongestSide.get_preprocess_shape(h, w, size)
            assert input_size((h, w), size) == expected
            assert max(input_size((h, w), size)) == size


@pytest.mark.parametrize("hw", [(1, 400), (400, 1), (1, 4000), (2, 3), (1, 1)])
def test_degenerate_image_sizes_go_through_every_transform(hw):
    """Issue 11 item 13: a 1 x 400 image crashed the resize (its short side scales to 0 px).
    No side is rounded to 0; the image, masks, grid and flips all work on it."""
    size = 64
    h_in, w_in = input_size(hw, size)
    assert min(h_in, w_in) >= 1 and max(h_in, w_in) == size
    image = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    tensor, input_hw = to_model_input(image, size)
    assert tensor.shape == (3, size, size) and input_hw == (h_in, w_in)
    assert tensor[:, h_in:, :].eq(0).all() and tensor[:, :, w_in:].eq(0).all()
    masks = np.ones((2, *hw), bool)
    lowres = masks_to_lowres(masks, hw, size)
    rows, cols = lowres_valid_hw(input_hw)
    assert lowres.shape == (2, size // 4, size // 4)
    assert not lowres[:, rows:].any() and not lowres[:, :, cols:].any()  # padding stays empty
    if min(h_in, w_in) >= 2:  # an object covering a real image covers its low-res blocks
        assert lowres[:, : rows - 1, : cols - 1].all()
    points = point_grid(4, input_hw)
    assert (
        np.isfinite(points).all() and (points[:, 0] <= w_in).all() and (points[:, 1] <= h_in).all()
    )
    flipped = hflip_lowres(hflip_lowres(lowres, input_hw), input_hw)
    assert torch.equal(flipped, lowres)


def test_resize_image_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        resize_image(np.zeros((4, 4, 3), np.float32), 64)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        resize_image(np.zeros((4, 4), np.uint8), 64)


# ----------------------------------------------------------------------------- masks_to_lowres


def test_lowres_full_and_empty_masks_non_square():
    masks = np.zeros((2, 48, 64), bool)
    masks[0] = True
    low = masks_to_lowres(masks, (48, 64), 64)
    assert low.shape == (2, 16, 16) and low.dtype == torch.bool
    assert low[0, :12].all() and not low[0, 12:].any()  # 48 / 4 = 12 valid rows, rest padding
    assert not low[1].any()


def test_lowres_rectangle_at_identity_scale_and_threshold():
    def rect(r0, r1, c0, c1):
        m = np.zeros((64, 64), bool)
        m[r0:r1, c0:c1] = True
        return m

    masks = np.stack(
        [
            rect(8, 24, 4, 12),  # exactly blocks rows 2..5, cols 1..2
            rect(10, 24, 4, 12),  # block row 2 half covered (0.5): kept
            rect(11, 24, 4, 12),  # block row 2 a quarter covered: dropped
        ]
    )
    low = masks_to_lowres(masks, (64, 64), 64)
    expected = torch.zeros((16, 16), dtype=torch.bool)
    expected[2:6, 1:3] = True
    assert torch.equal(low[0], expected)
    assert torch.equal(low[1], expected)
    expected[2] = False
    assert torch.equal(low[2], expected)


def test_lowres_rectangle_upscaled_and_downscaled():
    up = np.zeros((1, 32, 32), bool)
    up[0, 4:12, 8:16] = True  # x2 -> input rows 8..23, cols 16..31 -> blocks 2..5, 4..7
    down = np.zeros((1, 128, 96), bool)
    down[0, 16:48, 8:40] = True  # /2 -> input rows 8..23, cols 4..19 -> blocks 2..5, 1..4
    expected_up = torch.zeros((16, 16), dtype=torch.bool)
    expected_up[2:6, 4:8] = True
    expected_down = torch.zeros((16, 16), dtype=torch.bool)
    expected_down[2:6, 1:5] = True
    assert torch.equal(masks_to_lowres(up, (32, 32), 64)[0], expected_up)
    assert torch.equal(masks_to_lowres(down, (128, 96), 64)[0], expected_down)


def test_lowres_zero_masks_torch_input_and_chunking(monkeypatch):
    assert masks_to_lowres(np.zeros((0, 30, 50), bool), (30, 50), 64).shape == (0, 16, 16)
    rng = np.random.default_rng(1)
    masks = rng.random((7, 90, 130)) > 0.6
    whole = masks_to_lowres(masks, (90, 130), 64)
    assert torch.equal(masks_to_lowres(torch.from_numpy(masks), (90, 130), 64), whole)
    monkeypatch.setattr(transforms, "_LOWRES_CHUNK_BYTES", 1)  # one mask per chunk
    assert torch.equal(masks_to_lowres(masks, (90, 130), 64), whole)


def _overlap_matrix(n_orig: int, n_in: int, side: int) -> np.ndarray:
    """(side, n_orig): length of original pixel r inside block j (plain loops, for reference)."""
    scale = n_orig / n_in
    out = np.zeros((side, n_orig))
    for j in range(side):
        lo, hi = 4 * j * scale, 4 * (j + 1) * scale
        for r in range(n_orig):
            out[j, r] = max(0.0, min(hi, r + 1) - max(lo, r))
    return out / (4 * scale)


@pytest.mark.parametrize(
    ("hw", "size"),
    [((37, 53), 64), ((150, 97), 64), ((10, 13), 64), ((61, 200), 128), ((64, 62), 64)],
)
def test_lowres_equals_dense_area_coverage(hw, size):
    """Reference: covered fraction = Ay @ mask @ Ax^T with the overlap of every original pixel
    with every low-res block, thresholded at 0.5. Covers up- and downscaling, >4x upscaling
    (blocks smaller than a pixel) and widths that are not multiples of 4."""
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    masks = _blobs(rng, 6, hw) if min(hw) > 24 else rng.random((6, *hw)) > 0.5
    side = size // 4
    h_in, w_in = input_size(hw, size)
    ay, ax = _overlap_matrix(hw[0], h_in, side), _overlap_matrix(hw[1], w_in, side)
    cover = np.einsum("jr,mrc,kc->mjk", ay, masks.astype(np.float64), ax)
    got = masks_to_lowres(masks, hw, size)
    assert torch.equal(got, torch.from_numpy(cover >= 0.5 - 1e-9))
    # column-major masks (as pycocotools decodes them) take the transposed route: same result
    column_major = np.ascontiguousarray(masks.transpose(0, 2, 1)).transpose(0, 2, 1)
    assert not column_major.flags.c_contiguous
    assert torch.equal(masks_to_lowres(column_major, hw, size), got)
    # the torch prefix-sum path (used for GPU tensors) gives the same coverage
    rows = transforms._block_bounds(hw[0], h_in, side)
    cols = transforms._block_bounds(hw[1], w_in, side)
    via_torch = transforms._coverage_torch(torch.from_numpy(masks), rows, cols)
    np.testing.assert_allclose(via_torch.numpy(), cover, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lowres_on_gpu_equals_cpu():
    rng = np.random.default_rng(4)
    for hw, size in [((150, 97), 64), ((1500, 2250), 1024), ((10, 13), 64)]:
        masks = _blobs(rng, 5, hw) if min(hw) > 24 else rng.random((5, *hw)) > 0.5
        on_gpu = masks_to_lowres(torch.from_numpy(masks).cuda(), hw, size)
        assert on_gpu.is_cuda
        assert torch.equal(on_gpu.cpu(), masks_to_lowres(masks, hw, size))


def test_lowres_argument_errors():
    with pytest.raises(ValueError, match="does not match orig_hw"):
        masks_to_lowres(np.zeros((1, 10, 12), bool), (12, 10), 64)
    with pytest.raises(ValueError, match="multiple of 4"):
        lowres_size(66)


# ----------------------------------------------------------------------------- points and flips


def test_point_grid_lies_on_the_unpadded_image():
    grid = point_grid(4, (48, 64))
    assert grid[:, 0].min() == pytest.approx(8.0) and grid[:, 0].max() == pytest.approx(56.0)
    assert grid[:, 1].min() == pytest.approx(6.0) and grid[:, 1].max() == pytest.approx(42.0)
    assert grid[1, 0] > grid[0, 0] and grid[1, 1] == grid[0, 1]  # x varies fastest


def test_hflip_points_copies_and_mirrors_numpy_and_torch():
    pts = np.array([[0.5, 3.0], [63.5, 1.0]], np.float32)
    out = hflip_points(pts, (48, 64))
    np.testing.assert_array_equal(out, [[63.5, 3.0], [0.5, 1.0]])
    assert pts[0, 0] == 0.5  # input untouched
    t = torch.tensor([[10.0, 2.0]])
    assert torch.equal(hflip_points(t, (30, 40)), torch.tensor([[30.0, 2.0]]))
    assert t[0, 0] == 10.0


def _blobs(rng, m, hw):
    masks = np.zeros((m, *hw), bool)
    for k in range(m):
        r, c = rng.integers(0, hw[0] - 8), rng.integers(0, hw[1] - 8)
        masks[k, r : r + rng.integers(3, 20), c : c + rng.integers(3, 20)] = True
    return masks


def test_flip_image_masks_and_points_agree_when_width_is_multiple_of_4():
    rng = np.random.default_rng(2)
    hw, size = (40, 64), 64  # identity scale: input frame == original frame, w_in = 64
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    masks = _blobs(rng, 5, hw)
    input_hw = input_size(hw, size)

    flipped_input, _ = to_model_input(np.ascontiguousarray(image[:, ::-1]), size)
    assert torch.equal(hflip_input(to_model_input(image, size)[0], input_hw), flipped_input)

    low = masks_to_lowres(masks, hw, size)
    low_of_flipped = masks_to_lowres(np.ascontiguousarray(masks[..., ::-1]), hw, size)
    assert torch.equal(hflip_lowres(low, input_hw), low_of_flipped)
    assert np.array_equal(hflip_lowres(low.numpy(), input_hw), low_of_flipped.numpy())

    # a point inside a mask stays inside the flipped mask, in both frames
    for k in range(len(masks)):
        r, c = np.argwhere(masks[k])[0]
        p = np.array([[c + 0.5, r + 0.5]])
        fx, fy = hflip_points(p, input_hw)[0]
        assert masks[k, :, ::-1][int(fy), int(fx)]
        lr, lc = int(p[0, 1] // 4), int(p[0, 0] // 4)
        assert hflip_lowres(low, input_hw)[k, lr, int(fx // 4)] == low[k, lr, lc]


@pytest.mark.parametrize("width", [61, 62, 63])
def test_hflip_lowres_offset_when_width_is_not_multiple_of_4(width):
    """Documented convention: reversing the ceil(w_in/4) valid columns equals mirroring the
    image inside a canvas 4 * ceil(w_in/4) wide, i.e. the content lands p = 4*Wv - w_in input
    pixels right of a recomputation from the flipped masks."""
    rng = np.random.default_rng(width)
    hw = (64, width)  # height is the longest side: image_size 64 keeps the original frame
    input_hw = input_size(hw, 64)
    assert input_hw == hw
    valid = lowres_valid_hw(input_hw)[1]
    assert 4 * valid - width == (-width) % 4 > 0
    masks = _blobs(rng, 4, hw)
    low = masks_to_lowres(masks, hw, 64)
    canvas = np.zeros((4, 64, 4 * valid), bool)
    canvas[..., :width] = masks
    mirrored = np.ascontiguousarray(canvas[..., ::-1])  # flipped content, shifted right by p
    expected = masks_to_lowres(mirrored, (64, 4 * valid), 64)
    assert torch.equal(hflip_lowres(low, input_hw), expected)
    exact = masks_to_lowres(np.ascontiguousarray(masks[..., ::-1]), hw, 64)
    assert not torch.equal(hflip_lowres(low, input_hw), exact)  # the shift is real


@pytest.mark.parametrize("hw", [(150, 97), (97, 150), (200, 123)])
def test_hflip_input_commutes_with_resize(hw):
    """Flipping after resizing equals resizing the flipped original, padding kept bottom/right."""
    image = np.random.default_rng(3).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    model_input, input_hw = to_model_input(image, 64)
    flipped, _ = to_model_input(np.ascontiguousarray(image[:, ::-1]), 64)
    assert torch.equal(hflip_input(model_input, input_hw), flipped)
    assert torch.equal(hflip_input(model_input[None], input_hw)[0], flipped)  # batched
