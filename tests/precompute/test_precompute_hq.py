"""SAM-HQ teachers in everything mode and in precompute: agreement with segment-anything-hq's own
SamAutomaticMaskGenerator, the spec's block (a SAM teacher type + a SAM-HQ checkpoint) recorded
as the HQ teacher in the cache, hq_token_only, stored embeddings / tokens, --verify."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from precompute_helpers import (
    GEN,
    IMAGE_SIZE,
    LOGIT_SCALE,
    agreement,
    our_masks,
    reference_masks,
    run_cli,
    scale_mask_logits,
    write_config,
)

from maskteacher.cache_format import open_cache
from maskteacher.cache_format.manifest import load_header
from maskteacher.cli import main
from maskteacher.data import generate_sample, to_model_input
from maskteacher.models import build_sam
from maskteacher.models.everything import generate_everything

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # timm's deprecation warnings, imported by the package
    from segment_anything_hq import SamAutomaticMaskGenerator as HQMaskGenerator

HQ_TEACHER = "vit_b_tiny_hq"


def make_hq_teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return scale_mask_logits(build_sam(HQ_TEACHER, image_size=IMAGE_SIZE), LOGIT_SCALE)


@pytest.fixture(scope="module")
def hq_ckpt(tmp_path_factory):
    """A SAM-HQ checkpoint of the tiny ViT (random weights, SAM-like logit scale)."""
    path = tmp_path_factory.mktemp("hq") / "sam_hq_tiny.pth"
    torch.save(make_hq_teacher(0).state_dict(), path)
    return path


def test_agrees_with_segment_anything_hq_automatic_mask_generator(capsys):
    """>= 90 % of the package generator's masks have one of ours at IoU >= 0.9 in the original
    frame, and vice versa, >= 20 masks per image, at the same thresholds (NMS off and the IoU
    threshold calibrated per image to keep ~40 masks, as for SAM in test_precompute_generator)."""
    model = make_hq_teacher(0)
    base = {
        "points_per_side": 12,
        "points_per_batch": 64,
        "stability_score_thresh": 0.5,
        "stability_score_offset": 1.0,
        "box_nms_thresh": 1.0,
    }
    figures = []
    for sample in generate_sample(2, seed=3, size_range=(90, 150)):
        image = sample.image
        x, hw = to_model_input(image, IMAGE_SIZE)
        pool = generate_everything(
            model, x[None], [hw], [image.shape[:2]], pred_iou_thresh=0.0, **base
        )[0]
        top = torch.sort(pool.iou, descending=True).values
        assert len(top) > 41
        kwargs = {**base, "pred_iou_thresh": float(top[39] + top[40]) / 2}
        reference = HQMaskGenerator(model, crop_n_layers=0, **kwargs)  # hq_token_only=False
        ref = reference_masks(reference, image)
        (ours,) = our_masks(model, [image], **kwargs)
        ref_found, ours_found = agreement(ref, ours)
        figures.append((len(ref), len(ours), ref_found, ours_found))
        assert len(ref) >= 20
        assert ref_found >= 0.9 and ours_found >= 0.9, figures[-1]
    with capsys.disabled():
        for n_ref, n_ours, a, b in figures:
            print(
                f"\nSAM-HQ everything mode: package {n_ref} masks, ours {n_ours}; {a:.1%} / {b:.1%}"
            )


def test_hq_token_only_changes_the_masks():
    model = make_hq_teacher(0)
    x, hw = to_model_input(generate_sample(1, seed=4)[0].image, IMAGE_SIZE)
    kwargs = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    fused, hq_only = (
        generate_everything(
            model, x[None], [hw], [(90, 90)], box_nms_thresh=1.0, hq_token_only=flag, **kwargs
        )[0]
        for flag in (False, True)
    )
    assert len(fused) == len(hq_only) == 16
    assert torch.equal(fused.iou, hq_only.iou)  # the IoU head scores SAM's token either way
    assert (fused.logits - hq_only.logits).abs().max() > 1.0


def test_spec_block_with_a_sam_hq_checkpoint_makes_an_hq_cache(
    sample_root, hq_ckpt, tmp_path, caplog
):
    """teacher_type vit_b_tiny (a SAM type) + the SAM-HQ file, default strict: the cache header
    records vit_b_tiny_hq and hq_token_only; embeddings and tokens are stored as for SAM;
    --verify re-runs the HQ teacher; another hq_token_only on the same folder is refused."""
    store = {"store": {"embedding": True, "tokens": True}}
    config = write_config(tmp_path, train=sample_root, checkpoint=hq_ckpt, precompute=store)
    cfg_text = config.read_text()
    assert "vit_b_tiny\n" in cfg_text and "strict" not in cfg_text  # the spec's block, unchanged
    with caplog.at_level("INFO"):
        assert run_cli(config, "--verify", "2") == 0
    assert sum("SAM-HQ checkpoint detected" in r.message for r in caplog.records) == 1
    header = load_header(str(tmp_path / "cache"))
    assert header.teacher_type == "vit_b_tiny_hq"
    assert header.params["hq_token_only"] is False
    reader = open_cache(tmp_path / "cache")
    counts = [reader[i].num_masks for i in range(len(reader))]
    assert len(reader) == 6 and sum(counts) > 0
    rec = reader[counts.index(max(counts))]
    assert rec.tokens.shape == (rec.num_masks, 64) and rec.embedding.shape == (64, 8, 8)

    again = write_config(
        tmp_path, train=sample_root, checkpoint=hq_ckpt, precompute={**store, "hq_token_only": True}
    )
    assert main(["precompute", str(again), "--no-progress"]) == 2  # params.hq_token_only differs


def test_sam_cache_records_no_hq_setting(sample_root, teacher_ckpt, tmp_path):
    config = write_config(tmp_path, train=sample_root, checkpoint=teacher_ckpt)
    assert run_cli(config, "--limit", "2") == 0
    header = load_header(str(tmp_path / "cache"))
    assert header.teacher_type == "vit_b_tiny" and "hq_token_only" not in header.params
    assert header.params["points_per_side"] == GEN["points_per_side"]
    json.dumps(header.to_json())  # the header stays plain JSON
