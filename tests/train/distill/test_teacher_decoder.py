"""The teacher's decoder on its cached embedding is the full teacher run online, for exactly the
student's prompts (single mode: points and boxes; everything mode: grid points), up to the
embedding codec (fp16); where the decoder weights come from (the cache, else the checkpoint
with the cache's sha256) and the one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mask_teacher_helpers import save_teacher, tensorboard_scalars
from train_helpers import IMAGE_SIZE, make_data, tiny_config

from maskteacher.cache_format import open_cache
from maskteacher.config import TeacherEntry
from maskteacher.errors import UserError
from maskteacher.models import build_sam
from maskteacher.models.everything import encode_images
from maskteacher.models.prompt_features import decode_prompt_batch
from maskteacher.precompute import PrecomputeJob, run_precompute
from maskteacher.train import assemble, builders, train
from maskteacher.train.data.teacher_cache import load_teacher_decoder, open_teacher_cache
from maskteacher.train.distributed import DistInfo

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

FP16_REL = 2.0**-11  # fp16 rounding: half a unit in the last place, relative
BLOCKS = ("encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_decoder")
    out = {
        "root": root,
        "data": {"train": make_data(root / "train", images=3, seed=5)},
        "teacher": save_teacher(root / "sam_h.pth", 0, model_type="vit_b_tiny"),
        "student": save_teacher(root / "student.pt", 1, model_type="vit_t_tiny"),
    }
    cfg = config(out, "single")
    assert (
        run_precompute(PrecomputeJob.from_config(cfg, teacher="t", progress=False)).exit_code == 0
    )
    return out


def config(setup, mode: str, *, cache: bool = True, name: str = "cfg.yaml"):
    """Single (mixed points / boxes) or everything mode, the four blocks, one cached teacher
    't' (or, without ``cache``, the same teacher run online as the mask teacher)."""
    cfg, _ = tiny_config(
        setup["root"], setup["data"], name=name,
        dataset={"mode": mode, "prompt_mode": "mixed", "max_points": 3},
        model={"multimask_output": mode == "everything", "checkpoint_path": str(setup["student"]),
               "save_path": str(setup["root"] / name.replace(".yaml", ""))},
        distillation={"enable": True, **{b: {"enable": True} for b in BLOCKS}},
        precompute={"store": {"teacher": False, "gt": False, "embedding": True},
                    "num_workers": 0, "device": "cpu"},
        train={"max_prompts": 4, "batch_size": 3},
    )  # fmt: skip
    if cache:
        cfg.teachers = [
            TeacherEntry(name="t", type="vit_b_tiny", checkpoint=str(setup["teacher"]),
                         cache_path=str(setup["root"] / "cache"))
        ]  # fmt: skip
    else:
        cfg.mask_teacher.teacher_type = "vit_b_tiny"
        cfg.mask_teacher.checkpoint_path = str(setup["teacher"])
    return cfg


@pytest.mark.parametrize("mode", ["single", "everything"])
def test_decoder_on_cached_embedding_is_the_full_teacher(mode, setup):
    plan = builders.bind(config(setup, mode))
    batch = next(iter(assemble.open_data(plan, DistInfo(), CPU).train_loader))
    if mode == "single":
        assert batch.has_box.any() and (~batch.has_box).any() and batch.points.shape[1] > 1
    teacher = assemble.feature_distillation(plan, CPU).teachers[0]
    cached = torch.stack([t.embedding for t in teacher.source(batch)]).float()
    decoded = teacher.decoder(batch, cached)

    full = build_sam("vit_b_tiny", setup["teacher"], image_size=IMAGE_SIZE)  # online: encoder too
    online = encode_images(full, batch.images, batch.input_hw)
    assert ((cached - online).abs() <= FP16_REL * online.abs() + 1e-7).all()
    prompts = dict(
        points=batch.points, labels=batch.labels, boxes=batch.boxes, has_box=batch.has_box,
        prompt_image=batch.prompt_image, multimask_output=mode == "everything",
    )  # fmt: skip
    with torch.no_grad():
        on_fp16 = decode_prompt_batch(full, online.half().float(), **prompts)
        on_fp32 = decode_prompt_batch(full, online, **prompts)
    for name in ("low_res_logits", "iou_pred", "mask_tokens", "image_tokens"):
        got, same, exact = (getattr(d, name) for d in (decoded, on_fp16, on_fp32))
        assert got.shape[0] == batch.num_prompts
        assert torch.equal(got, same), name  # the full teacher's decoder on the cached values
        scale = exact.abs().max().item()
        assert (got - exact).abs().max().item() <= 4 * FP16_REL * scale, name


def test_cached_and_online_teacher_give_the_same_losses(setup):
    """One training step from the cache and one with the full teacher run online (its image
    encoder every step, then its decoder): the same four block values up to fp16."""
    kd = {}
    for online in (False, True):
        name = f"run_{'online' if online else 'cache'}.yaml"
        cfg = config(setup, "single", cache=not online, name=name)
        cfg.train.epochs = 1
        plan = builders.bind(cfg)
        if online:
            assert plan.online.provides == {"embedding"}  # the encoder only, no generation
        train(cfg)
        tags = tensorboard_scalars(setup["root"] / name.replace(".yaml", ""))
        teacher = "mask_teacher" if online else "t"
        kd[online] = {b: tags[f"train/kd/{teacher}/{b}"][0] for b in BLOCKS}
    for block in BLOCKS:
        assert math.isfinite(kd[False][block]) and kd[False][block] > 0
        assert kd[True][block] == pytest.approx(kd[False][block], rel=2e-3), block


def test_decoder_weights_come_from_the_cache_then_the_checkpoint(setup, tmp_path):
    reader = open_teacher_cache(str(setup["root"] / "cache"), where="teachers[0].cache_path")
    assert reader.manifest.decoder is not None  # precompute stored them (store.embedding)
    from_cache = load_teacher_decoder(
        reader, where="w", checkpoint=None, checkpoint_key="teachers[0].checkpoint"
    )
    state = torch.load(setup["teacher"], weights_only=True)
    for key, value in from_cache.state_dict().items():
        assert torch.equal(value, state[key]), key

    # a cache without the file (made before it was stored): the checkpoint, sha256-checked
    reader.manifest.decoder = None
    from_file = load_teacher_decoder(
        reader, where="w", checkpoint=str(setup["teacher"]), checkpoint_key="teachers[0].checkpoint"
    )
    assert all(torch.equal(v, state[k]) for k, v in from_file.state_dict().items())
    other = save_teacher(tmp_path / "other.pth", 9, model_type="vit_b_tiny")
    with pytest.raises(
        UserError, match=r"teachers\[0\].checkpoint .*other.pth has sha256 .* the cache"
    ):
        load_teacher_decoder(reader, where="w", checkpoint=str(other), checkpoint_key="teachers[0].checkpoint")  # fmt: skip
    with pytest.raises(UserError, match=r"holds no teacher_decoder.npz .* is not set"):
        load_teacher_decoder(reader, where="w", checkpoint=None, checkpoint_key="teachers[0].checkpoint")  # fmt: skip


def test_a_tampered_decoder_file_is_refused(setup, tmp_path):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(setup["root"] / "cache", copy)
    path = copy / "teacher_decoder.npz"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = open_cache(str(copy))
    with pytest.raises(UserError, match="teacher_decoder.npz: fails its sha256 check"):
        load_teacher_decoder(
            reader, where="teachers[0].cache_path", checkpoint=None, checkpoint_key="k"
        )


def test_the_decoder_is_the_teacher_type_of_the_cache(setup):
    reader = open_cache(str(setup["root"] / "cache"))
    decoder = load_teacher_decoder(reader, where="w", checkpoint=None, checkpoint_key="k")
    assert decoder.model_type == reader.header.teacher_type == "vit_b_tiny"
    assert decoder.image_size == IMAGE_SIZE and not hasattr(decoder, "image_encoder")
    assert not any(p.requires_grad for p in decoder.parameters()) and not decoder.training
    arrays = reader.decoder_weights()
    assert all(isinstance(v, np.ndarray) and v.dtype.kind == "f" for v in arrays.values())


def test_mask_teacher_cache_gives_the_batch_teacher_its_decoder(setup, tmp_path):
    """Everything mode, dual_supervision from the mask teacher's cache (masks + embeddings):
    no ``teachers`` entries, so the blocks distil from the batch's own teacher, whose decoder
    comes from that cache."""
    cfg, _ = tiny_config(
        tmp_path, setup["data"],
        model={"checkpoint_path": str(setup["student"])},
        mask_teacher={"enable": True, "method": "dual_supervision", "teacher_type": "vit_b_tiny",
                      "checkpoint_path": str(setup["teacher"]), "cache_path": str(tmp_path / "mt")},
        distillation={"enable": True, "prompt_embed": {"enable": True},
                      "dense_mask_logits": {"enable": True}},
        precompute={"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.3,
                    "store": {"embedding": True}, "num_workers": 0, "device": "cpu"},
        train={"prompt_source": "teacher_grid", "batch_size": 3},
    )  # fmt: skip
    assert run_precompute(PrecomputeJob.from_config(cfg, progress=False)).exit_code == 0
    cfg.mask_teacher.checkpoint_path = None  # the cache alone must do
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.losses)
    tags = tensorboard_scalars(tmp_path / "run")
    assert tags["train/kd/mask_teacher/prompt_embed"][0] > 0
    assert tags["train/kd/mask_teacher/dense_mask_logits"][0] > 0 and "train/soft" in tags


def test_sam_hq_teacher_tokens_distil_and_dense_is_refused(setup, tmp_path):
    hq = save_teacher(tmp_path / "sam_hq.pth", 3, model_type="vit_b_tiny_hq")
    cfg = config(setup, "single", name="hq.yaml")
    cfg.teachers = [TeacherEntry(name="hq", type="vit_b_tiny", checkpoint=str(hq),
                                 cache_path=str(tmp_path / "hq_cache"))]  # fmt: skip
    assert (
        run_precompute(PrecomputeJob.from_config(cfg, teacher="hq", progress=False)).exit_code == 0
    )
    assert open_cache(str(tmp_path / "hq_cache")).header.teacher_type == "vit_b_tiny_hq"
    with pytest.raises(UserError, match="dense_mask_logits: teacher 'hq' is SAM-HQ"):
        train(cfg)
    cfg.distillation.dense_mask_logits.enable = False
    cfg.train.epochs = 1
    train(cfg)
    tags = tensorboard_scalars(setup["root"] / "hq")
    assert tags["train/kd/hq/prompt_embed"][0] > 0 and tags["train/kd/hq/decoder_mask_token"][0] > 0
