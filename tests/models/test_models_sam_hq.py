"""SAM-HQ registry models: the package's parameters, the package's outputs on the same weights,
checkpoint detection for teachers (not for students), batched HQ decoding."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from maskteacher.data import generate_sample, to_model_input
from maskteacher.errors import UserError
from maskteacher.models import (
    HQ_VARIANTS,
    build_sam,
    built_teacher_type,
    is_hq_model,
    preprocess,
)
from maskteacher.models.everything import generate_everything
from maskteacher.models.features import decode_prompts, encode_features
from maskteacher.models.registry import TINY_DECODER, VIT_B_TINY, vit_encoder

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # timm's deprecation warnings, imported by the package
    from segment_anything_hq import SamPredictor, sam_model_registry
    from segment_anything_hq import modeling as hq

TEACHER_KEYS = ("mask_teacher.teacher_type", "mask_teacher.strict")


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["vit_h", "vit_l", "vit_b", "vit_tiny"])
def test_hq_entries_have_the_package_builders_parameters(name):
    """Every key and shape of segment-anything-hq's own builders (1024 input), nothing else."""
    ours_type = {"vit_tiny": "vit_t_hq"}.get(name, f"{name}_hq")
    if name == "vit_tiny":  # the package's TinyViT calls .item() while building: no meta device
        torch.manual_seed(0)
        reference = sam_model_registry[name]()
    else:
        with torch.device("meta"):
            reference = sam_model_registry[name]()
    with torch.device("meta"):
        ours = build_sam(ours_type, image_size=1024)
    assert shapes(ours) == shapes(reference)
    assert is_hq_model(ours) and isinstance(ours, hq.Sam) and ours.model_type == ours_type


def package_tiny_vit_b(image_size: int) -> hq.Sam:
    """The package's own Sam, ImageEncoderViT, PromptEncoder, MaskDecoderHQ and
    TwoWayTransformer with the test-sized widths (the package has no builder that small)."""
    dim, grid = TINY_DECODER.dim, image_size // 16
    return hq.Sam(
        image_encoder=vit_encoder(
            VIT_B_TINY, image_size, out_chans=dim, encoder_class=hq.ImageEncoderViT
        ),
        prompt_encoder=hq.PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=hq.MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=hq.TwoWayTransformer(
                depth=2, embedding_dim=dim, mlp_dim=TINY_DECODER.mlp_dim, num_heads=2
            ),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=TINY_DECODER.iou_hidden_dim,
            vit_dim=VIT_B_TINY.width,
        ),
    ).eval()


def package_model(name: str, image_size: int) -> hq.Sam:
    torch.manual_seed(0)
    if name == "vit_b_tiny_hq":
        return package_tiny_vit_b(image_size)
    return sam_model_registry[{"vit_t_hq": "vit_tiny", "vit_b_hq": "vit_b"}[name]]().eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.detach().float() - b.detach().float()).abs().max())


@pytest.mark.parametrize(
    ("name", "image_size"),
    [
        ("vit_b_tiny_hq", 128),
        ("vit_t_hq", 1024),  # our TinyViT vs the package's at the only size the package runs
        pytest.param("vit_b_hq", 1024, marks=pytest.mark.slow),
    ],
)
def test_hq_model_equals_the_package_model_on_the_same_weights(
    name, image_size, randomize, tmp_path, capsys
):
    """Seeded random weights (every tensor random), saved by the package's model, loaded by the
    spec's route (a SAM teacher type + the file): image features, HQ features, HQ low-res logits
    and IoU predictions per prompt, all four output modes, equal to the package's SamPredictor."""
    reference = package_model(name, image_size)
    randomize(reference, seed=1)
    reference.train().eval()  # the package's TinyViT caches its attention biases on eval()
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    plain = next(k for k, v in HQ_VARIANTS.items() if v == name)
    ours = build_sam(plain, path, image_size=image_size, config_keys=TEACHER_KEYS)
    assert ours.model_type == name

    image = generate_sample(1, seed=3, size_range=(90, 150))[0].image
    x, (h, w) = to_model_input(image, image_size)
    predictor = SamPredictor(reference)
    predictor.set_torch_image(x[None, :, :h, :w].float(), image.shape[:2])
    with torch.no_grad():
        _, interm = ours.image_encoder(preprocess(ours, x[None], torch.tensor([[h, w]])))
        features = encode_features(ours, x[None], torch.tensor([[h, w]]))
        want_hq = reference.mask_decoder.embedding_encoder(predictor.features)
        want_hq = want_hq + reference.mask_decoder.compress_vit_feat(
            predictor.interm_features[0].permute(0, 3, 1, 2)
        )
    scale = float(predictor.features.detach().abs().max())
    diffs = {
        "embedding": max_diff(features.embeddings, predictor.features),
        "early feature": max_diff(interm[0], predictor.interm_features[0]),
        "hq features": max_diff(features.hq, want_hq),
    }
    points = torch.rand(24, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([w, h])
    for multimask in (True, False):
        for hq_only in (False, True):
            _, iou, low = predictor.predict_torch(
                points[:, None],
                torch.ones(len(points), 1, dtype=torch.int),
                multimask_output=multimask,
                return_logits=True,
                hq_token_only=hq_only,
            )
            out = decode_prompts(
                ours, features, points, multimask_output=multimask, hq_token_only=hq_only
            )
            diffs[f"logits mm={multimask} hq_only={hq_only}"] = max_diff(out.low_res_logits, low)
            diffs[f"iou mm={multimask} hq_only={hq_only}"] = max_diff(out.iou_pred, iou)
            scale = max(scale, float(low.abs().max()))
    with capsys.disabled():
        print(f"\n{name} @{image_size}: max |ours - package| (largest value {scale:.3g}):")
        for key, value in diffs.items():
            print(f"  {key:32s} {value:.3g}")
    assert all(v <= 1e-5 * max(1.0, scale) for v in diffs.values()), diffs


# ------------------------------------------------------------------------- detection


def tiny_hq_file(tmp_path, name="vit_b_tiny_hq", image_size=64):
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pth"
    torch.save(build_sam(name, image_size=image_size).state_dict(), path)
    return path


def test_teacher_with_a_sam_type_and_a_sam_hq_file_builds_sam_hq(tmp_path, caplog):
    path = tiny_hq_file(tmp_path)
    with caplog.at_level(logging.INFO, logger="maskteacher.models.build"):
        model = build_sam("vit_b_tiny", path, image_size=64, config_keys=TEACHER_KEYS)
    detected = [r.getMessage() for r in caplog.records if "SAM-HQ checkpoint detected" in r.message]
    assert len(detected) == 1
    assert "mask_teacher.teacher_type vit_b_tiny is built as vit_b_tiny_hq" in detected[0]
    assert model.model_type == "vit_b_tiny_hq" and is_hq_model(model)
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # explicit HQ type names work too, and say nothing about detection
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maskteacher.models.build"):
        explicit = build_sam("vit_b_tiny_hq", path, image_size=64, config_keys=TEACHER_KEYS)
    assert explicit.model_type == "vit_b_tiny_hq"
    assert not any("SAM-HQ checkpoint detected" in r.message for r in caplog.records)
    assert built_teacher_type("vit_b_tiny", path) == "vit_b_tiny_hq"
    assert built_teacher_type("vit_b_tiny", tmp_path / "absent.pth") == "vit_b_tiny"
    assert built_teacher_type("vit_b_tiny_hq", path) == "vit_b_tiny_hq"


def test_student_given_a_sam_hq_file_gets_the_strict_loading_error(tmp_path):
    path = tiny_hq_file(tmp_path)
    with pytest.raises(UserError) as info:
        build_sam("vit_b_tiny", path, image_size=64)  # the student's config keys
    message = str(info.value)
    assert "does not match model vit_b_tiny" in message and "\n" not in message
    assert "unexpected (mask_decoder.hf_token.weight, mask_decoder.hf_mlp.*" in message
    assert "set model.strict: false" in message
    # a teacher can opt out of detection: then the same strict error
    with pytest.raises(UserError, match="mask_teacher.strict: false"):
        build_sam("vit_b_tiny", path, image_size=64, config_keys=TEACHER_KEYS, detect_hq=False)


def test_sam_hq_type_with_a_sam_file_and_wrong_backbones_fail_clearly(tmp_path):
    torch.manual_seed(0)
    sam = tmp_path / "sam.pth"
    torch.save(build_sam("vit_b_tiny", image_size=64).state_dict(), sam)
    with pytest.raises(UserError) as info:
        build_sam("vit_b_tiny_hq", sam, image_size=64, config_keys=TEACHER_KEYS)
    assert "missing (mask_decoder.hf_token.weight, mask_decoder.hf_mlp.*" in str(info.value)
    hq_t = tiny_hq_file(tmp_path, "vit_t_tiny_hq")
    with pytest.raises(UserError) as info:
        build_sam("vit_b_tiny", hq_t, image_size=64, config_keys=TEACHER_KEYS)
    assert "a TinyViT encoder" in str(info.value)
    assert "mask_teacher.teacher_type is vit_b_tiny (as vit_b_tiny_hq)" in str(info.value)


def test_sam_hq_file_of_another_image_size_is_resized(tmp_path):
    path = tiny_hq_file(tmp_path, image_size=128)
    model = build_sam("vit_b_tiny", path, image_size=64, config_keys=TEACHER_KEYS)
    assert model.image_size == 64 and model.image_encoder.pos_embed.shape == (1, 4, 4, 64)


# ------------------------------------------------------------------------- decoding


def test_hq_decoding_across_images_equals_image_by_image():
    torch.manual_seed(0)
    model = build_sam("vit_t_tiny_hq", image_size=64)
    samples = generate_sample(3, seed=5, size_range=(40, 70))
    inputs = [to_model_input(s.image, 64) for s in samples]
    images = torch.stack([x for x, _ in inputs])
    hw = torch.tensor([h for _, h in inputs])
    features = encode_features(model, images, hw)
    assert features.hq.shape == (3, 8, 16, 16)
    points = torch.rand(10, 2) * 60
    index = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0])
    batched = decode_prompts(
        model, features, points, image_index=index, multimask_output=True, return_tokens=True
    )
    assert batched.low_res_logits.shape == (10, 1, 16, 16) and batched.tokens.shape == (10, 1, 64)
    for b in range(3):
        one = encode_features(model, images[b : b + 1], hw[b : b + 1])
        alone = decode_prompts(
            model, one, points[index == b], multimask_output=True, return_tokens=True
        )
        for name in ("low_res_logits", "iou_pred", "tokens"):
            torch.testing.assert_close(
                getattr(batched, name)[index == b], getattr(alone, name), atol=1e-5, rtol=1e-5
            )
    empty = decode_prompts(model, features, torch.zeros(0, 2), multimask_output=True)
    assert empty.low_res_logits.shape == (0, 1, 16, 16)


def test_generate_everything_with_sam_hq_needs_the_images():
    torch.manual_seed(0)
    model = build_sam("vit_b_tiny_hq", image_size=64)
    x, hw = to_model_input(np.zeros((50, 60, 3), np.uint8), 64)
    with pytest.raises(ValueError, match="SAM-HQ model"):
        generate_everything(
            model, None, [hw], [(50, 60)], image_embeddings=torch.zeros(1, 64, 4, 4)
        )
    outs = generate_everything(
        model,
        x[None],
        [hw],
        [(50, 60)],
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        return_tokens=True,
        return_embedding=True,
    )
    assert len(outs[0]) == 16  # one mask per prompt (SAM-HQ selects among the three)
    assert outs[0].tokens.shape == (16, 64) and outs[0].embedding.shape == (64, 4, 4)
