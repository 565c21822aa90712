"""The config sections of data, student, training, freezing, pictures, stages, precompute
and cache reading (the teachers' sections are in :mod:`maskteacher.config.teachers`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from maskteacher.config.fields import option


@dataclass
class DatasetConfig:
    train_dataset: str | None = option(
        None, "Training data: a folder (folder / SA-1B layout) or a COCO instances JSON."
    )
    val_dataset: str | None = option(
        None, "Validation data, same formats as train_dataset (null: no validation)."
    )
    format: Literal["folder", "sa1b", "coco"] | None = option(
        None,
        "Dataset layout; null detects it from the path (folder: image/ + mask/; sa1b: <id>.jpg + <id>.json; coco: instances JSON).",
    )
    image_root: str | None = option(
        None, "COCO only: folder holding the image files (default: next to the annotations)."
    )
    include_crowd: bool = option(False, "COCO only: also read iscrowd=1 annotations as objects.")
    skip_bad: bool = option(
        False, "Skip (log and count) unreadable images / masks / annotations instead of stopping."
    )
    mode: Literal["single", "everything"] = option(
        "single",
        "single: one prompt per object (the origin's default); everything: grid prompts matched to all objects.",
    )
    grid_points: int = option(
        16, "Everything mode: grid prompts per side over the unpadded image.", ge=1
    )
    num_workers: int = option(4, "DataLoader worker processes.", ge=0)
    prompt_mode: Literal["point", "points", "box", "mixed"] = option(
        "point",
        "Single mode: prompt each object with points, a box, or a random choice of the two.",
    )
    min_points: int = option(1, "Single mode: fewest points sampled inside an object.", ge=1)
    max_points: int = option(3, "Single mode: most points sampled inside an object.", ge=1)
    max_bbox_shift: int = option(
        20, "Single mode: largest random shift (pixels, original frame) of box corners.", ge=0
    )


@dataclass
class ModelConfig:
    type: str = option(
        "vit_t",
        "Student backbone: a maskteacher.models registry name (vit_t, vit_b, vit_l, vit_h, tiny test variants).",
    )
    checkpoint_path: str | None = option(
        None,
        "Student weights to start from (.pt/.pth; flat state_dict, {'model':...} or {'state_dict':...}).",
    )
    strict: bool = option(
        True,
        "Require every checkpoint key to match; false loads what matches and reports the rest.",
    )
    image_size: int = option(
        1024, "Model input size (longest side, padded square); must be a multiple of 16.", ge=16
    )
    multimask_output: bool = option(False, "Decode 3 candidate masks per prompt instead of 1.")
    save_path: str = option(
        "./logs", "Run directory: checkpoints, TensorBoard logs, resolved config."
    )


@dataclass
class LossWeights:
    bce: float = option(1.0, "Binary cross-entropy on matched pairs.", ge=0)
    focal: float = option(15.0, "Sigmoid focal loss on matched pairs.", ge=0)
    dice: float = option(1.0, "Dice loss on matched pairs.", ge=0)
    iou: float = option(
        1.0, "MSE between the predicted-IoU head and the actual IoU of matched pairs.", ge=0
    )
    cls: float = option(
        1.0, "Pushes the predicted-IoU head toward 0 for predictions matched to nothing.", ge=0
    )


@dataclass
class TrainConfig:
    epochs: int = option(10, "Training epochs.", ge=1)
    lr: float = option(5e-5, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = option(1e-4, "AdamW weight decay.", ge=0)
    encoder_lr_scale: float = option(
        0.1, "Learning-rate multiplier for the image encoder's parameters.", ge=0
    )
    batch_size: int = option(2, "Images per step (per process under DDP).", ge=1)
    val_freq: int = option(1, "Validate every N epochs.", ge=1)
    gradient_accumulation: int = option(
        1, "Steps whose gradients are summed before an optimizer step.", ge=1
    )
    bf16: bool = option(False, "bfloat16 autocast for forward passes.")
    grad_clip: float | None = option(
        1.0, "Clip the gradient norm to this value (null: no clipping).", gt=0
    )
    warmup_step: int = option(
        250, "Linear warmup steps (optimizer steps) before the cosine decay.", ge=0
    )
    min_lr_ratio: float = option(0.0, "Cosine decay floor as a fraction of lr.", ge=0, le=1)
    resume: bool | str = option(
        False,
        "false: start fresh; true: continue from save_path/last.pt; a path: continue from that checkpoint.",
    )
    early_stop_patience: int = option(
        20, "Stop after this many validations without improvement (0: never).", ge=0
    )
    seed: int = option(0, "Random seed (python, numpy, torch, data order, prompts).", ge=0)
    loss_weights: LossWeights = option(factory=LossWeights, help="Weights of the task loss terms.")
    prompt_source: Literal["grid", "gt", "mixed", "teacher", "teacher_grid"] = option(
        "grid",
        "Everything mode prompts: grid (dataset.grid_points), gt (one interior point per object), mixed (both), "
        "teacher (the cached teacher's prompt points), teacher_grid (teacher points plus the grid).",
    )
    max_prompts: int = option(
        64, "Everything mode: at most this many prompts per image per step (random subset).", ge=1
    )
    points_per_batch: int = option(256, "Prompts decoded per mask-decoder call.", ge=1)
    match_iou_threshold: float = option(
        0.3, "Matched pairs below this IoU are dropped (the origin's 0.3).", ge=0, le=1
    )
    match_requires_point: bool = option(
        False, "Only match a prediction to a target that contains its prompt point."
    )
    match_cost_dice: float = option(
        0.0, "Weight of a dice cost added to the matcher's (1 - IoU) cost (0: IoU only).", ge=0
    )
    match_cost_bce: float = option(
        0.0, "Weight of a BCE cost added to the matcher's (1 - IoU) cost (0: IoU only).", ge=0
    )
    match_points: int | None = option(
        None,
        "Matcher dice/BCE costs on this many sampled pixels per image (null: all low-res pixels).",
        ge=1,
    )
    loss_points: int | None = option(
        None,
        "Compute mask losses on this many sampled pixels per pair (null: all low-res pixels).",
        ge=1,
    )
    point_decoding: bool = option(
        True,
        "With loss_points: decode the student's mask logits with gradients only at the sampled pixels (exact, far less memory; masks for matching and IoU targets come from a no-grad pass); false: full maps with gradients.",
    )
    hflip: bool = option(
        False, "Random horizontal flip of image, ground truth, teacher outputs and prompts."
    )
    log_every: int = option(10, "TensorBoard scalar logging interval in steps.", ge=1)
    device: str = option("auto", "auto (cuda when available), cpu, cuda or cuda:N.")
    compile: bool = option(False, "torch.compile the student's training step.")
    checkpoint_decoder: bool = option(
        False,
        "Recompute the mask decoder's per-prompt activations in the backward pass (less memory, more time).",
    )
    checkpoint_every: int | None = option(
        None,
        "Also write last.pt every N optimizer steps within an epoch (null: at epoch ends only).",
        ge=1,
    )


@dataclass
class FreezeConfig:
    freeze_image_encoder: bool = option(False, "Keep the image encoder's weights fixed.")
    freeze_prompt_encoder: bool = option(False, "Keep the prompt encoder's weights fixed.")
    freeze_mask_decoder: bool = option(False, "Keep the mask decoder's weights fixed.")
    unfreeze_epoch: int | None = option(
        None, "Epoch at which all frozen parts become trainable (null: never).", ge=0
    )
    batchnorm_eval: bool = option(
        True, "Keep BatchNorm layers (TinyViT) in eval mode while fine-tuning."
    )


@dataclass
class VisualConfig:
    status: bool = option(False, "Save overlay pictures of validation images during training.")
    save_path: str | None = option(None, "Where overlays go (null: <model.save_path>/visual).")
    IOU_threshold: float = option(
        0.5, "Draw the student's masks whose predicted IoU is at least this.", ge=0, le=1
    )
    save_every_n_epochs: int = option(1, "Save overlays every N epochs.", ge=1)
    num_images: int = option(4, "How many validation images (the first ones) are drawn.", ge=1)


@dataclass
class StageConfig:
    name: str = option("stage", "Name shown in logs.")
    start_epoch: int = option(0, "First epoch of this stage (inclusive).", ge=0)
    end_epoch: int | None = option(None, "End epoch (exclusive; null: train.epochs).", ge=0)
    distillation: bool | None = option(
        None, "Turn the feature-distillation block on/off in this stage (null: unchanged)."
    )
    lambda_coef: float | None = option(
        None, "distillation.lambda_coef in this stage (null: unchanged).", ge=0
    )
    loss_weights: dict[str, float] | None = option(
        None, "Overrides of train.loss_weights in this stage (only the keys given)."
    )


@dataclass
class StoreConfig:
    teacher: bool = option(
        True, "Teacher masks: low-res logits, prompt points, predicted IoU, stability, boxes."
    )
    gt: bool = option(True, "Ground-truth masks in the low-res frame (bit-packed).")
    embedding: bool = option(
        False,
        "Teacher image embedding (fp16, 2 MB per image at image_size 1024) and the teacher's prompt encoder + mask decoder weights (once per cache), needed by encoder/attention/RKD matching and the origin's four blocks.",
    )
    tokens: bool = option(
        False, "Per-mask mask-decoder output tokens (fp16), needed by decoder_matching."
    )


@dataclass
class PrecomputeConfig:
    points_per_side: int = option(32, "Teacher grid prompts per side.", ge=1)
    points_per_batch: int = option(64, "Prompts decoded per mask-decoder call.", ge=1)
    pred_iou_thresh: float = option(
        0.88, "Keep teacher masks whose predicted IoU is above this (0: no IoU filter).", ge=0, le=1
    )
    stability_score_thresh: float = option(
        0.95, "Keep teacher masks whose stability score is at least this.", ge=0, le=1
    )
    stability_score_offset: float = option(1.0, "Logit offset used by the stability score.", ge=0)
    box_nms_thresh: float = option(
        0.7, "Box IoU above which NMS removes the lower-scoring mask.", ge=0, le=1
    )
    max_masks_per_image: int | None = option(
        None, "Keep at most this many masks per image, by predicted IoU (null: all).", ge=1
    )
    multimask_output: bool = option(
        True, "Decode 3 candidate masks per grid point, as SamAutomaticMaskGenerator does."
    )
    hq_token_only: bool = option(
        False,
        "SAM-HQ teachers: true keeps only the HQ token's mask; false adds it to SAM's best mask, as segment-anything-hq's SamAutomaticMaskGenerator does. Ignored by SAM models.",
    )
    strategy: Literal["grid", "hierarchical"] = option(
        "grid",
        "Which grid prompts are decoded: grid (all); hierarchical (after TinySAM: a sparse grid first, then the other grid points outside its confident masks; fewer prompts, may miss parts inside confident masks).",
    )
    hierarchical_stride: int = option(
        4,
        "hierarchical: the first pass decodes every N-th row and column of the grid (1/N^2 of the prompts).",
        ge=1,
    )
    hierarchical_logit_thresh: float = option(
        8.5,
        "hierarchical: a grid point is skipped when a mask the first pass kept has a logit above this at its pixel.",
    )
    store: StoreConfig = option(factory=StoreConfig, help="What goes into the cache.")
    backend: Literal["zarr", "hdf5"] = option("zarr", "Cache shard format.")
    codec: Literal["int8", "fp16"] = option(
        "int8", "Logit codec: int8 (linear, clipped at +-clip) or fp16."
    )
    clip: float = option(12.0, "int8 codec: logits are clipped to [-clip, clip].", gt=0)
    shard_size: int = option(256, "Images per cache shard (the unit of resume).", ge=1)
    batch_size: int = option(4, "Images encoded per image-encoder call.", ge=1)
    num_workers: int = option(2, "DataLoader workers that decode and resize images.", ge=0)
    bf16: bool = option(False, "bfloat16 autocast for the teacher.")
    sdpa: bool = option(
        False,
        "Run the ViT teacher encoder's attention through scaled_dot_product_attention (same results to float rounding; 1.15x on CPU for vit_b @1024).",
    )
    compile: bool = option(
        False,
        "torch.compile the teacher's decoder calls (a one-time compile of ~30-60 s; 2x on CPU for SAM's 256-wide decoder).",
    )
    device: str = option(
        "auto", "auto (cuda when available; LOCAL_RANK under torchrun), cpu, cuda or cuda:N."
    )
    max_failed_fraction: float = option(
        0.01, "Exit non-zero when more than this fraction of images failed.", ge=0, le=1
    )


@dataclass
class CacheConfig:
    verify_on_open: bool = option(
        False,
        "Check each shard's checksums (sha256 of its files) the first time a training process reads from it; a corrupt shard is refused.",
    )
