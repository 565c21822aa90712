"""The teachers' config sections: feature distillation (its blocks, ``teachers``) and the
mask teacher (the spec's block), with the helpers that resolve a teacher's type and weight."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from maskteacher.config.fields import option
from maskteacher.config_files import parse_config_text, read_config_text
from maskteacher.errors import UserError


@dataclass
class EncoderMatching:
    enable: bool = option(
        False, "Match the student's image embedding to the cached teacher embedding."
    )
    lambda_mse: float = option(1.0, "Weight of the MSE term.", ge=0)
    lambda_kl: float = option(
        1.0, "Weight of the temperature-softmax KL term (over spatial positions).", ge=0
    )
    temperature: float = option(1.0, "Softmax temperature of the KL term.", gt=0)
    weight: float = option(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DecoderMatching:
    enable: bool = option(
        False, "Match matched pairs' mask-decoder output tokens to the cached teacher tokens."
    )
    lambda_mse: float = option(1.0, "Weight of the MSE term.", ge=0)
    lambda_cos: float = option(1.0, "Weight of the (1 - cosine similarity) term.", ge=0)
    lambda_kl: float = option(
        1.0, "Weight of the temperature-softmax KL term (over channels).", ge=0
    )
    temperature: float = option(1.0, "Softmax temperature of the KL term.", gt=0)
    weight: float = option(1.0, "Overall weight of this block.", ge=0)


@dataclass
class AttentionMatching:
    enable: bool = option(
        False, "Attention-transfer maps from the embeddings, KL with temperature."
    )
    lambda_: float = option(1.0, "Weight of this loss.", key="lambda", ge=0)
    temperature: float = option(0.5, "Softmax temperature over spatial positions.", gt=0)
    weight: float = option(1.0, "Overall weight of this block.", ge=0)


@dataclass
class RelationalKD:
    enable: bool = option(
        False,
        "Relational KD (distance + angle) on pooled embedding vectors across the batch (0 with fewer than 3 images).",
    )
    lambda_: float = option(1.0, "Weight of this loss.", key="lambda", ge=0)
    dist_factor: float = option(1.0, "Weight of the RKD distance term.", ge=0)
    angle_factor: float = option(2.0, "Weight of the RKD angle term.", ge=0)
    weight: float = option(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DynamicLambda:
    enable_plateau_scheduler: bool = option(
        False,
        "Scale lambda_coef by factor after patience validations without improvement, and back up (by 1 / factor, at most to the configured lambda_coef) after one that improves; needs dataset.val_dataset.",
    )
    patience: int = option(5, "Validations without improvement before lambda_coef is scaled.", ge=0)
    factor: float = option(0.5, "Multiplier applied to lambda_coef on a plateau.", gt=0, le=1)


@dataclass
class EncoderPatch:
    enable: bool = option(
        False, "Image embedding vs the teacher's cached one: w_l2 * MSE + w_cos * (1 - cosine)."
    )
    w_l2: float = option(1.0, "Weight of the MSE term.", ge=0)
    w_cos: float = option(1.0, "Weight of the (1 - cosine similarity) term.", ge=0)
    weight: float = option(1.0, "Overall weight of this block.", ge=0)


@dataclass
class PromptEmbed:
    enable: bool = option(
        False,
        "Per prompt: the decoder transformer's prompt-conditioned image embedding vs the teacher decoder's for the same prompt (teacher decoder on the cached embedding).",
    )
    w_mse: float = option(1.0, "Weight of the MSE of channel-normalised embeddings.", ge=0)
    w_cos: float = option(1.0, "Weight of the (1 - cosine similarity) term.", ge=0)
    weight: float = option(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DecoderMaskToken:
    enable: bool = option(
        False,
        "Per prompt: the 4 mask tokens' outputs vs the teacher decoder's, temperature-softmax KL over channels (x T^2, summed over tokens).",
    )
    w_kl: float = option(1.0, "Weight of the KL term.", ge=0)
    temperature: float = option(0.5, "Softmax temperature T.", gt=0)
    weight: float = option(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DenseMaskLogits:
    enable: bool = option(
        False,
        "Per prompt: low-res mask logits vs the teacher decoder's for the same prompt: Bernoulli KL(teacher || student) + soft-target focal, per pixel (SAM teachers).",
    )
    w_kl: float = option(1.0, "Weight of the Bernoulli KL term.", ge=0)
    w_focal: float = option(1.0, "Weight of the soft-target focal term.", ge=0)
    gamma: float = option(2.0, "Focal loss focusing parameter.", ge=0)
    weight: float = option(1.0, "Overall weight of this block.", ge=0)


@dataclass
class DistillationConfig:
    enable: bool = option(False, "Turn the feature-distillation block on.")
    lambda_coef: float = option(1.0, "Scales the sum of all feature-distillation losses.", ge=0)
    encoder_matching: EncoderMatching = option(
        factory=EncoderMatching, help="Image-embedding matching."
    )
    decoder_matching: DecoderMatching = option(
        factory=DecoderMatching, help="Mask-decoder output-token matching."
    )
    attention_matching: AttentionMatching = option(
        factory=AttentionMatching, help="Attention-transfer matching."
    )
    relational_KD: RelationalKD = option(
        factory=RelationalKD, help="Relational knowledge distillation."
    )
    use_precomputed_features: bool = option(
        True,
        "Origin key; teacher features always come from the teacher's cache when cache_path is set.",
        unused=True,
    )
    precomputed_root: str | None = option(
        None, "Origin key (per-file .npy feature dumps); use teachers[].cache_path.", unused=True
    )
    dynamic_lambda: DynamicLambda = option(
        factory=DynamicLambda, help="Plateau scheduling of lambda_coef on validation."
    )
    encoder_patch: EncoderPatch = option(
        factory=EncoderPatch, help="The origin's encoder patch-token block (image embedding)."
    )
    prompt_embed: PromptEmbed = option(
        factory=PromptEmbed, help="The origin's prompt-conditioned embedding block."
    )
    decoder_mask_token: DecoderMaskToken = option(
        factory=DecoderMaskToken, help="The origin's decoder mask-token block."
    )
    dense_mask_logits: DenseMaskLogits = option(
        factory=DenseMaskLogits, help="The origin's dense mask-logit block."
    )


@dataclass
class TeacherEntry:
    name: str = option("teacher", "Name used in logs and TensorBoard.")
    cfg: str | None = option(
        None, "Origin key: a YAML whose model.type names the backbone (used when type is null)."
    )
    checkpoint: str | None = option(None, "Teacher weights.")
    weight: float | None = option(
        None, "Weight of this teacher's feature losses (null: 1 / number of teachers).", ge=0
    )
    type: str | None = option(
        None, "Registry name of the teacher backbone (vit_h, vit_l, vit_b, vit_t, ...)."
    )
    cache_path: str | None = option(
        None,
        "Where this teacher's precomputed cache lives (maskteacher precompute --teacher NAME); required for distillation.",
    )
    strict: bool = option(True, "Require every checkpoint key to match.")


@dataclass
class SoftLoss:
    type: Literal["l2", "kl", "kl_teacher"] = option(
        "l2",
        "l2: MSE of logits; kl: Bernoulli KL(sigmoid(student) || sigmoid(teacher)) (the spec's; "
        "its gradient vanishes where the student is confidently wrong); kl_teacher: "
        "KL(sigmoid(teacher) || sigmoid(student)) (gradient sigmoid(student) - sigmoid(teacher)).",
    )
    weight: float = option(
        0.5, "lambda_soft: multiplies the soft loss before it is added to the task loss.", ge=0
    )


@dataclass
class MaskTeacherConfig:
    enable: bool = option(
        False, "Turn mask-teacher supervision on (needs dataset.mode: everything)."
    )
    method: Literal["replace_gt", "dual_supervision"] = option(
        "replace_gt",
        "replace_gt: teacher masks (GT-corrected) are the only targets; dual_supervision: GT targets + soft teacher loss.",
    )
    teacher_type: str = option(
        "vit_h",
        "Teacher backbone: vit_h (SAM-H), vit_l, vit_b, vit_t (MobileSAM), their SAM-HQ variants (vit_h_hq, ...) or a tiny test variant; a SAM-HQ checkpoint on a SAM type builds its SAM-HQ variant.",
    )
    checkpoint_path: str | None = option(
        None,
        "Teacher weights (needed to run the teacher online or to precompute); when the file exists, its sha256 must match the cache's.",
    )
    strict: bool = option(
        True,
        "Require every teacher checkpoint key to match; false loads what matches and reports the rest.",
    )
    iou_threshold: float = option(
        0.3,
        "Hungarian pairs below this IoU are not used: replace_gt's teacher<->GT pairs (replaced by the GT), "
        "dual_supervision's student<->teacher pairs (soft loss) and decoder_matching's pairs; IoU-0 pairs never count.",
        ge=0,
        le=1,
    )
    soft_loss: SoftLoss = option(
        factory=SoftLoss, help="dual_supervision: the pixel-wise soft loss."
    )
    gt_override: bool = option(
        True,
        "replace_gt: replace matched teacher masks by their GT mask; false: teacher masks are soft targets, GT ignored.",
    )
    cache_path: str | None = option(
        None,
        "Precomputed teacher outputs (maskteacher precompute writes here); when set, training never builds the teacher.",
    )
    allow_empty_teacher: bool = option(
        False,
        "Train replace_gt / dual_supervision even when the cached teacher kept no mask on most images (refused by default: thresholds too strict for the teacher).",
    )


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
