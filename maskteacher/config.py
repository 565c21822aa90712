"""Typed configuration: dataclass sections loaded from YAML or JSON, validated at load time.

The layout follows the origin project's JSON configs (``dataset``, ``model``, ``train``,
``freeze``, ``distillation``, ``teachers``, ``mask_teacher``, ``visual``, ``stage_schedule``) so
that users' existing files keep working, plus our own ``precompute`` and ``cache`` sections.

Every field carries its help text, allowed values and range in ``dataclasses.field`` metadata;
the loader, the ``--set`` overrides and the generated config reference (docs) all read the same
metadata, so they cannot drift apart.

Only wiring code (CLI, builders) sees a :class:`Config`; leaf functions take plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from maskteacher.config_files import parse_config_text, read_config_file, read_config_text
from maskteacher.errors import UserError

log = logging.getLogger(__name__)


def _f(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    key: str | None = None,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    unused: bool = False,
) -> Any:
    """A dataclass field with the metadata the loader and the docs use.

    key: the name in the file when it differs from the attribute (``lambda`` is a keyword).
    ge / le / gt: numeric bounds. unused: accepted for compatibility with the origin project's
    configs but not implemented; loading it with a non-default value logs one warning.
    """
    meta = {"help": help, "key": key, "ge": ge, "le": le, "gt": gt, "unused": unused}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------- sections


@dataclass
class DatasetConfig:
    train_dataset: str | None = _f(
        None, "Training data: a folder (folder / SA-1B layout) or a COCO instances JSON."
    )
    val_dataset: str | None = _f(
        None, "Validation data, same formats as train_dataset (null: no validation)."
    )
    format: Literal["folder", "sa1b", "coco"] | None = _f(
        None,
        "Dataset layout; null detects it from the path (folder: image/ + mask/; sa1b: <id>.jpg + <id>.json; coco: instances JSON).",
    )
    image_root: str | None = _f(
        None, "COCO only: folder holding the image files (default: next to the annotations)."
    )
    include_crowd: bool = _f(False, "COCO only: also read iscrowd=1 annotations as objects.")
    skip_bad: bool = _f(
        False, "Skip (log and count) unreadable images / masks / annotations instead of stopping."
    )
    mode: Literal["single", "everything"] = _f(
        "single",
        "single: one prompt per object (the origin's default); everything: grid prompts matched to all objects.",
    )
    grid_points: int = _f(
        16, "Everything mode: grid prompts per side over the unpadded image.", ge=1
    )
    num_workers: int = _f(4, "DataLoader worker processes.", ge=0)
    prompt_mode: Literal["point", "points", "box", "mixed"] = _f(
        "point",
        "Single mode: prompt each object with points, a box, or a random choice of the two.",
    )
    min_points: int = _f(1, "Single mode: fewest points sampled inside an object.", ge=1)
    max_points: int = _f(3, "Single mode: most points sampled inside an object.", ge=1)
    max_bbox_shift: int = _f(
        20, "Single mode: largest random shift (pixels, original frame) of box corners.", ge=0
    )


@dataclass
class ModelConfig:
    type: str = _f(
        "vit_t",
        "Student backbone: a maskteacher.models registry name (vit_t, vit_b, vit_l, vit_h, tiny test variants).",
    )
    checkpoint_path: str | None = _f(
        None,
        "Student weights to start from (.pt/.pth; flat state_dict, {'model':...} or {'state_dict':...}).",
    )
    strict: bool = _f(
        True,
        "Require every checkpoint key to match; false loads what matches and reports the rest.",
    )
    image_size: int = _f(
        1024, "Model input size (longest side, padded square); must be a multiple of 16.", ge=16
    )
    multimask_output: bool = _f(False, "Decode 3 candidate masks per prompt instead of 1.")
    save_path: str = _f("./logs", "Run directory: checkpoints, TensorBoard logs, resolved config.")


@dataclass
class LossWeights:
    bce: float = _f(1.0, "Binary cross-entropy on matched pairs.", ge=0)
    focal: float = _f(15.0, "Sigmoid focal loss on matched pairs.", ge=0)
    dice: float = _f(1.0, "Dice loss on matched pairs.", ge=0)
    iou: float = _f(
        1.0, "MSE between the predicted-IoU head and the actual IoU of matched pairs.", ge=0
    )
    cls: float = _f(
        1.0, "Pushes the predicted-IoU head toward 0 for predictions matched to nothing.", ge=0
    )


@dataclass
class TrainConfig:
    epochs: int = _f(10, "Training epochs.", ge=1)
    lr: float = _f(5e-5, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = _f(1e-4, "AdamW weight decay.", ge=0)
    encoder_lr_scale: float = _f(
        0.1, "Learning-rate multiplier for the image encoder's parameters.", ge=0
    )
    batch_size: int = _f(2, "Images per step (per process under DDP).", ge=1)
    val_freq: int = _f(1, "Validate every N epochs.", ge=1)
    gradient_accumulation: int = _f(
        1, "Steps whose gradients are summed before an optimizer step.", ge=1
    )
    bf16: bool = _f(False, "bfloat16 autocast for forward passes.")
    grad_clip: float | None = _f(
        1.0, "Clip the gradient norm to this value (null: no clipping).", gt=0
    )
    warmup_step: int = _f(
        250, "Linear warmup steps (optimizer steps) before the cosine decay.", ge=0
    )
    min_lr_ratio: float = _f(0.0, "Cosine decay floor as a fraction of lr.", ge=0, le=1)
    resume: bool | str = _f(
        False,
        "false: start fresh; true: continue from save_path/last.pt; a path: continue from that checkpoint.",
    )
    early_stop_patience: int = _f(
        20, "Stop after this many validations without improvement (0: never).", ge=0
    )
    seed: int = _f(0, "Random seed (python, numpy, torch, data order, prompts).", ge=0)
    loss_weights: LossWeights = _f(factory=LossWeights, help="Weights of the task loss terms.")
    prompt_source: Literal["grid", "gt", "mixed", "teacher", "teacher_grid"] = _f(
        "grid",
        "Everything mode prompts: grid (dataset.grid_points), gt (one interior point per object), mixed (both), "
        "teacher (the cached teacher's prompt points), teacher_grid (teacher points plus the grid).",
    )
    max_prompts: int = _f(
        64, "Everything mode: at most this many prompts per image per step (random subset).", ge=1
    )
    points_per_batch: int = _f(256, "Prompts decoded per mask-decoder call.", ge=1)
    match_iou_threshold: float = _f(
        0.3, "Matched pairs below this IoU are dropped (the origin's 0.3).", ge=0, le=1
    )
    match_requires_point: bool = _f(
        False, "Only match a prediction to a target that contains its prompt point."
    )
    match_cost_dice: float = _f(
        0.0, "Weight of a dice cost added to the matcher's (1 - IoU) cost (0: IoU only).", ge=0
    )
    match_cost_bce: float = _f(
        0.0, "Weight of a BCE cost added to the matcher's (1 - IoU) cost (0: IoU only).", ge=0
    )
    match_points: int | None = _f(
        None,
        "Matcher dice/BCE costs on this many sampled pixels per image (null: all low-res pixels).",
        ge=1,
    )
    loss_points: int | None = _f(
        None,
        "Compute mask losses on this many sampled pixels per pair (null: all low-res pixels).",
        ge=1,
    )
    point_decoding: bool = _f(
        True,
        "With loss_points: decode the student's mask logits with gradients only at the sampled pixels (exact, far less memory; masks for matching and IoU targets come from a no-grad pass); false: full maps with gradients.",
    )
    hflip: bool = _f(
        False, "Random horizontal flip of image, ground truth, teacher outputs and prompts."
    )
    log_every: int = _f(10, "TensorBoard scalar logging interval in steps.", ge=1)
    device: str = _f("auto", "auto (cuda when available), cpu, cuda or cuda:N.")
    compile: bool = _f(False, "torch.compile the student's training step.")
    checkpoint_decoder: bool = _f(
        False,
        "Recompute the mask decoder's per-prompt activations in the backward pass (less memory, more time).",
    )
    checkpoint_every: int | None = _f(
        None,
        "Also write last.pt every N optimizer steps within an epoch (null: at epoch ends only).",
        ge=1,
    )


@dataclass
class FreezeConfig:
    freeze_image_encoder: bool = _f(False, "Keep the image encoder's weights fixed.")
    freeze_prompt_encoder: bool = _f(False, "Keep the prompt encoder's weights fixed.")
    freeze_mask_decoder: bool = _f(False, "Keep the mask decoder's weights fixed.")
    unfreeze_epoch: int | None = _f(
        None, "Epoch at which all frozen parts become trainable (null: never).", ge=0
    )
    batchnorm_eval: bool = _f(
        True, "Keep BatchNorm layers (TinyViT) in eval mode while fine-tuning."
    )


@dataclass
class EncoderMatching:
    enable: bool = _f(False, "Match the student's image embedding to the cached teacher embedding.")
    lambda_mse: float = _f(1.0, "Weight of the MSE term.", ge=0)
    lambda_kl: float = _f(
        1.0, "Weight of the temperature-softmax KL term (over spatial positions).", ge=0
    )
    temperature: float = _f(1.0, "Softmax temperature of the KL term.", gt=0)
    weight: float = _f(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DecoderMatching:
    enable: bool = _f(
        False, "Match matched pairs' mask-decoder output tokens to the cached teacher tokens."
    )
    lambda_mse: float = _f(1.0, "Weight of the MSE term.", ge=0)
    lambda_cos: float = _f(1.0, "Weight of the (1 - cosine similarity) term.", ge=0)
    lambda_kl: float = _f(1.0, "Weight of the temperature-softmax KL term (over channels).", ge=0)
    temperature: float = _f(1.0, "Softmax temperature of the KL term.", gt=0)
    weight: float = _f(1.0, "Overall weight of this block.", ge=0)


@dataclass
class AttentionMatching:
    enable: bool = _f(False, "Attention-transfer maps from the embeddings, KL with temperature.")
    lambda_: float = _f(1.0, "Weight of this loss.", key="lambda", ge=0)
    temperature: float = _f(0.5, "Softmax temperature over spatial positions.", gt=0)
    weight: float = _f(1.0, "Overall weight of this block.", ge=0)


@dataclass
class RelationalKD:
    enable: bool = _f(
        False,
        "Relational KD (distance + angle) on pooled embedding vectors across the batch (0 with fewer than 3 images).",
    )
    lambda_: float = _f(1.0, "Weight of this loss.", key="lambda", ge=0)
    dist_factor: float = _f(1.0, "Weight of the RKD distance term.", ge=0)
    angle_factor: float = _f(2.0, "Weight of the RKD angle term.", ge=0)
    weight: float = _f(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DynamicLambda:
    enable_plateau_scheduler: bool = _f(
        False,
        "Scale lambda_coef by factor after patience validations without improvement, and back up (by 1 / factor, at most to the configured lambda_coef) after one that improves; needs dataset.val_dataset.",
    )
    patience: int = _f(5, "Validations without improvement before lambda_coef is scaled.", ge=0)
    factor: float = _f(0.5, "Multiplier applied to lambda_coef on a plateau.", gt=0, le=1)


@dataclass
class EncoderPatch:
    enable: bool = _f(
        False, "Image embedding vs the teacher's cached one: w_l2 * MSE + w_cos * (1 - cosine)."
    )
    w_l2: float = _f(1.0, "Weight of the MSE term.", ge=0)
    w_cos: float = _f(1.0, "Weight of the (1 - cosine similarity) term.", ge=0)
    weight: float = _f(1.0, "Overall weight of this block.", ge=0)


@dataclass
class PromptEmbed:
    enable: bool = _f(
        False,
        "Per prompt: the decoder transformer's prompt-conditioned image embedding vs the teacher decoder's for the same prompt (teacher decoder on the cached embedding).",
    )
    w_mse: float = _f(1.0, "Weight of the MSE of channel-normalised embeddings.", ge=0)
    w_cos: float = _f(1.0, "Weight of the (1 - cosine similarity) term.", ge=0)
    weight: float = _f(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DecoderMaskToken:
    enable: bool = _f(
        False,
        "Per prompt: the 4 mask tokens' outputs vs the teacher decoder's, temperature-softmax KL over channels (x T^2, summed over tokens).",
    )
    w_kl: float = _f(1.0, "Weight of the KL term.", ge=0)
    temperature: float = _f(0.5, "Softmax temperature T.", gt=0)
    weight: float = _f(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DenseMaskLogits:
    enable: bool = _f(
        False,
        "Per prompt: low-res mask logits vs the teacher decoder's for the same prompt: Bernoulli KL(teacher || student) + soft-target focal, per pixel (SAM teachers).",
    )
    w_kl: float = _f(1.0, "Weight of the Bernoulli KL term.", ge=0)
    w_focal: float = _f(1.0, "Weight of the soft-target focal term.", ge=0)
    gamma: float = _f(2.0, "Focal loss focusing parameter.", ge=0)
    weight: float = _f(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DistillationConfig:
    enable: bool = _f(False, "Turn the feature-distillation block on.")
    lambda_coef: float = _f(1.0, "Scales the sum of all feature-distillation losses.", ge=0)
    encoder_matching: EncoderMatching = _f(
        factory=EncoderMatching, help="Image-embedding matching."
    )
    decoder_matching: DecoderMatching = _f(
        factory=DecoderMatching, help="Mask-decoder output-token matching."
    )
    attention_matching: AttentionMatching = _f(
        factory=AttentionMatching, help="Attention-transfer matching."
    )
    relational_KD: RelationalKD = _f(
        factory=RelationalKD, help="Relational knowledge distillation."
    )
    use_precomputed_features: bool = _f(
        True,
        "Origin key; teacher features always come from the teacher's cache when cache_path is set.",
        unused=True,
    )
    precomputed_root: str | None = _f(
        None, "Origin key (per-file .npy feature dumps); use teachers[].cache_path.", unused=True
    )
    dynamic_lambda: DynamicLambda = _f(
        factory=DynamicLambda, help="Plateau scheduling of lambda_coef on validation."
    )
    encoder_patch: EncoderPatch = _f(
        factory=EncoderPatch, help="The origin's encoder patch-token block (image embedding)."
    )
    prompt_embed: PromptEmbed = _f(
        factory=PromptEmbed, help="The origin's prompt-conditioned embedding block."
    )
    decoder_mask_token: DecoderMaskToken = _f(
        factory=DecoderMaskToken, help="The origin's decoder mask-token block."
    )
    dense_mask_logits: DenseMaskLogits = _f(
        factory=DenseMaskLogits, help="The origin's dense mask-logit block."
    )


@dataclass
class TeacherEntry:
    name: str = _f("teacher", "Name used in logs and TensorBoard.")
    cfg: str | None = _f(
        None, "Origin key: a YAML whose model.type names the backbone (used when type is null)."
    )
    checkpoint: str | None = _f(None, "Teacher weights.")
    weight: float | None = _f(
        None, "Weight of this teacher's feature losses (null: 1 / number of teachers).", ge=0
    )
    type: str | None = _f(
        None, "Registry name of the teacher backbone (vit_h, vit_l, vit_b, vit_t, ...)."
    )
    cache_path: str | None = _f(
        None,
        "Where this teacher's precomputed cache lives (maskteacher precompute --teacher NAME); required for distillation.",
    )
    strict: bool = _f(True, "Require every checkpoint key to match.")


@dataclass
class SoftLoss:
    type: Literal["l2", "kl", "kl_teacher"] = _f(
        "l2",
        "l2: MSE of logits; kl: Bernoulli KL(sigmoid(student) || sigmoid(teacher)) (the spec's; "
        "its gradient vanishes where the student is confidently wrong); kl_teacher: "
        "KL(sigmoid(teacher) || sigmoid(student)) (gradient sigmoid(student) - sigmoid(teacher)).",
    )
    weight: float = _f(
        0.5, "lambda_soft: multiplies the soft loss before it is added to the task loss.", ge=0
    )


@dataclass
class MaskTeacherConfig:
    enable: bool = _f(False, "Turn mask-teacher supervision on (needs dataset.mode: everything).")
    method: Literal["replace_gt", "dual_supervision"] = _f(
        "replace_gt",
        "replace_gt: teacher masks (GT-corrected) are the only targets; dual_supervision: GT targets + soft teacher loss.",
    )
    teacher_type: str = _f(
        "vit_h",
        "Teacher backbone: vit_h (SAM-H), vit_l, vit_b, vit_t (MobileSAM), their SAM-HQ variants (vit_h_hq, ...) or a tiny test variant; a SAM-HQ checkpoint on a SAM type builds its SAM-HQ variant.",
    )
    checkpoint_path: str | None = _f(
        None,
        "Teacher weights (needed to run the teacher online or to precompute); when the file exists, its sha256 must match the cache's.",
    )
    strict: bool = _f(
        True,
        "Require every teacher checkpoint key to match; false loads what matches and reports the rest.",
    )
    iou_threshold: float = _f(
        0.3,
        "Hungarian pairs below this IoU are not used: replace_gt's teacher<->GT pairs (replaced by the GT), "
        "dual_supervision's student<->teacher pairs (soft loss) and decoder_matching's pairs; IoU-0 pairs never count.",
        ge=0,
        le=1,
    )
    soft_loss: SoftLoss = _f(factory=SoftLoss, help="dual_supervision: the pixel-wise soft loss.")
    gt_override: bool = _f(
        True,
        "replace_gt: replace matched teacher masks by their GT mask; false: teacher masks are soft targets, GT ignored.",
    )
    cache_path: str | None = _f(
        None,
        "Precomputed teacher outputs (maskteacher precompute writes here); when set, training never builds the teacher.",
    )
    allow_empty_teacher: bool = _f(
        False,
        "Train replace_gt / dual_supervision even when the cached teacher kept no mask on most images (refused by default: thresholds too strict for the teacher).",
    )


@dataclass
class VisualConfig:
    status: bool = _f(False, "Save overlay pictures of validation images during training.")
    save_path: str | None = _f(None, "Where overlays go (null: <model.save_path>/visual).")
    IOU_threshold: float = _f(
        0.5, "Draw the student's masks whose predicted IoU is at least this.", ge=0, le=1
    )
    save_every_n_epochs: int = _f(1, "Save overlays every N epochs.", ge=1)
    num_images: int = _f(4, "How many validation images (the first ones) are drawn.", ge=1)


@dataclass
class StageConfig:
    name: str = _f("stage", "Name shown in logs.")
    start_epoch: int = _f(0, "First epoch of this stage (inclusive).", ge=0)
    end_epoch: int | None = _f(None, "End epoch (exclusive; null: train.epochs).", ge=0)
    distillation: bool | None = _f(
        None, "Turn the feature-distillation block on/off in this stage (null: unchanged)."
    )
    lambda_coef: float | None = _f(
        None, "distillation.lambda_coef in this stage (null: unchanged).", ge=0
    )
    loss_weights: dict[str, float] | None = _f(
        None, "Overrides of train.loss_weights in this stage (only the keys given)."
    )


@dataclass
class StoreConfig:
    teacher: bool = _f(
        True, "Teacher masks: low-res logits, prompt points, predicted IoU, stability, boxes."
    )
    gt: bool = _f(True, "Ground-truth masks in the low-res frame (bit-packed).")
    embedding: bool = _f(
        False,
        "Teacher image embedding (fp16, 2 MB per image at image_size 1024) and the teacher's prompt encoder + mask decoder weights (once per cache), needed by encoder/attention/RKD matching and the origin's four blocks.",
    )
    tokens: bool = _f(
        False, "Per-mask mask-decoder output tokens (fp16), needed by decoder_matching."
    )


@dataclass
class PrecomputeConfig:
    points_per_side: int = _f(32, "Teacher grid prompts per side.", ge=1)
    points_per_batch: int = _f(64, "Prompts decoded per mask-decoder call.", ge=1)
    pred_iou_thresh: float = _f(
        0.88, "Keep teacher masks whose predicted IoU is above this (0: no IoU filter).", ge=0, le=1
    )
    stability_score_thresh: float = _f(
        0.95, "Keep teacher masks whose stability score is at least this.", ge=0, le=1
    )
    stability_score_offset: float = _f(1.0, "Logit offset used by the stability score.", ge=0)
    box_nms_thresh: float = _f(
        0.7, "Box IoU above which NMS removes the lower-scoring mask.", ge=0, le=1
    )
    max_masks_per_image: int | None = _f(
        None, "Keep at most this many masks per image, by predicted IoU (null: all).", ge=1
    )
    multimask_output: bool = _f(
        True, "Decode 3 candidate masks per grid point, as SamAutomaticMaskGenerator does."
    )
    hq_token_only: bool = _f(
        False,
        "SAM-HQ teachers: true keeps only the HQ token's mask; false adds it to SAM's best mask, as segment-anything-hq's SamAutomaticMaskGenerator does. Ignored by SAM models.",
    )
    strategy: Literal["grid", "hierarchical"] = _f(
        "grid",
        "Which grid prompts are decoded: grid (all); hierarchical (after TinySAM: a sparse grid first, then the other grid points outside its confident masks; fewer prompts, may miss parts inside confident masks).",
    )
    hierarchical_stride: int = _f(
        4,
        "hierarchical: the first pass decodes every N-th row and column of the grid (1/N^2 of the prompts).",
        ge=1,
    )
    hierarchical_logit_thresh: float = _f(
        8.5,
        "hierarchical: a grid point is skipped when a mask the first pass kept has a logit above this at its pixel.",
    )
    store: StoreConfig = _f(factory=StoreConfig, help="What goes into the cache.")
    backend: Literal["zarr", "hdf5"] = _f("zarr", "Cache shard format.")
    codec: Literal["int8", "fp16"] = _f(
        "int8", "Logit codec: int8 (linear, clipped at +-clip) or fp16."
    )
    clip: float = _f(12.0, "int8 codec: logits are clipped to [-clip, clip].", gt=0)
    shard_size: int = _f(256, "Images per cache shard (the unit of resume).", ge=1)
    batch_size: int = _f(4, "Images encoded per image-encoder call.", ge=1)
    num_workers: int = _f(2, "DataLoader workers that decode and resize images.", ge=0)
    bf16: bool = _f(False, "bfloat16 autocast for the teacher.")
    sdpa: bool = _f(
        False,
        "Run the ViT teacher encoder's attention through scaled_dot_product_attention (same results to float rounding; 1.15x on CPU for vit_b @1024).",
    )
    compile: bool = _f(
        False,
        "torch.compile the teacher's decoder calls (a one-time compile of ~30-60 s; 2x on CPU for SAM's 256-wide decoder).",
    )
    device: str = _f(
        "auto", "auto (cuda when available; LOCAL_RANK under torchrun), cpu, cuda or cuda:N."
    )
    max_failed_fraction: float = _f(
        0.01, "Exit non-zero when more than this fraction of images failed.", ge=0, le=1
    )


@dataclass
class CacheConfig:
    verify_on_open: bool = _f(
        False,
        "Check each shard's checksums (sha256 of its files) the first time a training process reads from it; a corrupt shard is refused.",
    )


@dataclass
class Config:
    dataset: DatasetConfig = _f(factory=DatasetConfig, help="Data and prompts.")
    model: ModelConfig = _f(factory=ModelConfig, help="The student.")
    train: TrainConfig = _f(factory=TrainConfig, help="Optimisation and the training loop.")
    freeze: FreezeConfig = _f(factory=FreezeConfig, help="Frozen parts of the student.")
    distillation: DistillationConfig = _f(
        factory=DistillationConfig, help="Feature distillation from teachers."
    )
    teachers: list[TeacherEntry] = _f(
        factory=list, help="Feature-distillation teachers, each with its own cache."
    )
    mask_teacher: MaskTeacherConfig = _f(
        factory=MaskTeacherConfig, help="Mask-teacher supervision (the spec's block)."
    )
    visual: VisualConfig = _f(factory=VisualConfig, help="Overlay pictures during training.")
    stage_schedule: list[StageConfig] = _f(factory=list, help="Per-epoch-range overrides.")
    precompute: PrecomputeConfig = _f(
        factory=PrecomputeConfig, help="Teacher cache generation (maskteacher precompute)."
    )
    cache: CacheConfig = _f(factory=CacheConfig, help="Reading the teacher cache.")

    # -- convenience -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data, keys as they appear in files."""
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str | Path) -> None:
        """Write the resolved config (YAML or JSON by suffix) atomically."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else self.to_yaml()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


# ------------------------------------------------------------------------------------ loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load, override and validate a config file.

    path: ``.yaml`` / ``.yml`` / ``.json`` (chosen by extension).
    overrides: ``section.key=value`` strings; values are parsed as YAML scalars.
    Raises UserError with one line naming the key, the value and what is allowed.
    """
    data = read_config_file(path)
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data, source=str(path))


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to raw config data in place (list items: ``teachers.0.weight``)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    dotted, raw = item.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = _list_item(node, part, dotted)
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        index = int(last) if last.isdigit() else -1
        if not 0 <= index < len(node):
            raise UserError(
                f"--set {dotted}: list index {last} out of range (the list has {len(node)} items)"
            )
        node[index] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {dotted}: '{'.'.join(parts[:-1])}' is not a section")


def _list_item(node: list, part: str, dotted: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(
            f"--set {dotted}: '{part}' is not an index of a list with {len(node)} items"
        )
    return node[int(part)]


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> Config:
    """Build and validate a Config from raw (file) data."""
    cfg = _build(Config, data, "")
    _validate_cross_fields(cfg)
    _check_model_types(cfg)
    _warn_unused(cfg)
    return cfg


# Builders for the dataclass tree --------------------------------------------------------------


def _file_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and ranges."""
    where = path or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of keys, got {_show(data)}")
    fields = {_file_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise UserError(_unknown_key_message(path, str(key), list(fields)))
    kwargs = {}
    for key, f in fields.items():
        if key not in data:
            continue
        key_path = f"{path}.{key}" if path else key
        value = _convert(hints[f.name], data[key], key_path)
        _check_range(f, value, key_path)
        kwargs[f.name] = value
    return cls(**kwargs)


def _unknown_key_message(path: str, key: str, valid: list[str]) -> str:
    full = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
    section = f"'{path}'" if path else "the top level"
    return f"unknown config key '{full}'{hint} (valid keys in {section}: {', '.join(valid)})"


def _convert(tp: Any, value: Any, key_path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # `X | None`: X's own error is the precise one
            try:
                return _convert(members[0], value, key_path)
            except UserError as exc:
                own = str(exc).startswith(f"{key_path}: ") and type(None) in args
                raise UserError(f"{exc} (or null)" if own else str(exc)) from None
        # bool first so that `resume: true` stays a bool rather than the string "True"
        members.sort(key=lambda a: a is not bool)
        for member in members:
            try:
                return _convert(member, value, key_path)
            except UserError as exc:
                errors.append(exc)
        allowed = " or ".join(_describe(a) for a in args)
        raise UserError(f"{key_path}: got {_show(value)}; expected {allowed}")
    if origin is Literal:
        if value not in args:
            raise UserError(
                f"{key_path}: got {_show(value)}; allowed values: {', '.join(repr(a) for a in args)}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key_path}: expected a list, got {_show(value)}")
        return [_convert(args[0], item, f"{key_path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key_path}: expected a mapping, got {_show(value)}")
        return {str(k): _convert(args[1], v, f"{key_path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key_path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key_path}: got {_show(value)}; expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key_path}: got {_show(value)}; expected an integer")
    if tp is float:
        return _finite_float(value, key_path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key_path}: got {_show(value)}; expected a string")
    if tp is Any:
        return value
    raise TypeError(f"config field {key_path} has an unsupported type {tp!r}")  # programming error


def _finite_float(value: Any, key_path: str) -> float:
    """A finite float from a number (or a YAML 1.1 string such as ``1e-4``); inf / nan are
    config errors: they pass every range check and then train on garbage."""
    number = _as_float(value)
    if number is None:
        raise UserError(f"{key_path}: got {_show(value)}; expected a number")
    if not math.isfinite(number):
        raise UserError(f"{key_path}: got {_show(value)}; expected a finite number")
    return number


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer beyond the float range
            return math.inf
    if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_range(f: dataclasses.Field, value: Any, key_path: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    ge, le, gt = f.metadata.get("ge"), f.metadata.get("le"), f.metadata.get("gt")
    bounds = []
    if ge is not None:
        bounds.append(f">= {ge:g}")
    if gt is not None:
        bounds.append(f"> {gt:g}")
    if le is not None:
        bounds.append(f"<= {le:g}")
    ok = (ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le)
    if not ok:
        if ge is not None and le is not None:
            allowed = f"a value in [{ge:g}, {le:g}]"
        else:
            allowed = "a value " + " and ".join(bounds)
        raise UserError(f"{key_path}: got {value!r}; allowed: {allowed}")


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string (path)"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return repr(value)


# Cross-field checks ---------------------------------------------------------------------------


def _validate_cross_fields(cfg: Config) -> None:
    mt = cfg.mask_teacher
    if mt.enable and cfg.dataset.mode != "everything":
        raise UserError(
            'mask_teacher.enable: true needs dataset.mode: "everything" (Hungarian matching requires '
            f'multi-mask targets); got dataset.mode: "{cfg.dataset.mode}"'
        )
    if cfg.dataset.min_points > cfg.dataset.max_points:
        raise UserError(
            f"dataset.min_points ({cfg.dataset.min_points}) must not exceed dataset.max_points ({cfg.dataset.max_points})"
        )
    if cfg.model.image_size % 16:
        raise UserError(
            f"model.image_size: got {cfg.model.image_size}; allowed: a multiple of 16 (e.g. 1024, 256)"
        )
    valid_weights = [f.name for f in dataclasses.fields(LossWeights)]
    for i, stage in enumerate(cfg.stage_schedule):
        where = f"stage_schedule[{i}]"
        end = cfg.train.epochs if stage.end_epoch is None else stage.end_epoch
        if end <= stage.start_epoch:
            raise UserError(
                f"{where}: end_epoch ({end}) must be greater than start_epoch ({stage.start_epoch})"
            )
        for key, value in (stage.loss_weights or {}).items():
            if key not in valid_weights:
                raise UserError(_unknown_key_message(f"{where}.loss_weights", key, valid_weights))
            if value < 0:
                raise UserError(f"{where}.loss_weights.{key}: got {value!r}; allowed: a value >= 0")
    names = [t.name for t in cfg.teachers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"teachers: names must be unique; repeated: {', '.join(dupes)}")


def check_model_type(name: str, key_path: str) -> str:
    """``name`` when it is a :data:`maskteacher.models.MODEL_TYPES` registry name; UserError
    naming the key, the value and the registry's names otherwise."""
    from maskteacher.models import MODEL_TYPES  # lazy: the registry imports torch

    if name in MODEL_TYPES:
        return name
    close = difflib.get_close_matches(name, MODEL_TYPES, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"{key_path}: got {name!r}; allowed: a model registry name ({', '.join(MODEL_TYPES)}){hint}"
    )


def _check_model_types(cfg: Config) -> None:
    """The student, mask-teacher and feature-teacher types are registry names."""
    check_model_type(cfg.model.type, "model.type")
    check_model_type(cfg.mask_teacher.teacher_type, "mask_teacher.teacher_type")
    for i, entry in enumerate(cfg.teachers):
        if entry.type is not None:
            check_model_type(entry.type, f"teachers[{i}].type")


def _warn_unused(cfg: Config) -> None:
    """One warning listing origin keys that are accepted but not implemented, when set."""
    used = []
    for key_path, f, value in _walk(cfg, ""):
        if f.metadata.get("unused") and value != _default_of(f):
            used.append(key_path)
    if used:
        log.warning(
            "config keys accepted for compatibility with the origin project, not used: %s",
            ", ".join(used),
        )


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _walk(obj: Any, path: str):
    """Yield (key path, field, value) for every leaf field of a dataclass tree."""
    for f in dataclasses.fields(obj):
        key_path = f"{path}.{_file_key(f)}" if path else _file_key(f)
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, key_path)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _walk(item, f"{key_path}[{i}]")
        else:
            yield key_path, f, value


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_file_key(f): _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def resolve_teacher_type(entry: TeacherEntry) -> str:
    """Registry name of a feature-distillation teacher: ``type``, else ``model.type`` in its ``cfg`` YAML."""
    if entry.type:
        return entry.type
    if entry.cfg:
        path = Path(entry.cfg)
        if not path.is_file():
            raise UserError(
                f"teachers '{entry.name}': cfg file {path} not found and no 'type' given"
            )
        data = parse_config_text(read_config_text(path), "yaml", path) or {}
        model_type = (data.get("model") or {}).get("type") if isinstance(data, dict) else None
        if isinstance(model_type, str):
            return check_model_type(model_type, f"teachers '{entry.name}': model.type in {path}")
        raise UserError(
            f"teachers '{entry.name}': {path} has no model.type; set teachers[].type (e.g. vit_h)"
        )
    raise UserError(f"teachers '{entry.name}': set 'type' (a registry name such as vit_h) or 'cfg'")


def teacher_weights(entries: list[TeacherEntry]) -> list[float]:
    """Per-teacher weights; a missing weight is 1 / number of teachers (the origin's rule)."""
    return [1.0 / len(entries) if t.weight is None else t.weight for t in entries]


# ------------------------------------------------------------------------------ reference docs


def iter_reference(cls: type = Config, path: str = ""):
    """Yield (key path, type text, default text, help) for every key: the generated config reference."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _file_key(f)
        key_path = f"{path}.{key}" if path else key
        tp = hints[f.name]
        origin = typing.get_origin(tp)
        help_text = f.metadata.get("help", "")
        if f.metadata.get("unused"):
            help_text += " (accepted, not used)"
        if dataclasses.is_dataclass(tp):
            yield key_path, "section", "", help_text
            yield from iter_reference(tp, key_path)
        elif origin is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            yield key_path, "list", "[]", help_text
            yield from iter_reference(typing.get_args(tp)[0], key_path + "[]")
        else:
            default = _default_of(f)
            yield key_path, _type_text(tp), json.dumps(default), help_text


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_text(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, str(tp))


REFERENCE_BEGIN = "<!-- config-reference:begin (generated by: maskteacher config reference --update README.md) -->"
REFERENCE_END = "<!-- config-reference:end -->"


def reference_markdown() -> str:
    """The config reference as a Markdown table (README / docs/config_reference.md)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key_path, type_text, default, help_text in iter_reference():
        if type_text == "section":
            lines.append(f"| **`{key_path}`** | section | | {help_text} |")
        else:
            type_cell = type_text.replace("|", "\\|")
            lines.append(f"| `{key_path}` | {type_cell} | `{default}` | {help_text} |")
    return "\n".join(lines) + "\n"
