"""Feature distillation from cached (or online) teachers: the ``distillation`` config block.

Registered as an auxiliary loss (:func:`feature_kd_from_config`); the trainer runs it after the
supervision strategy. Blocks (losses in :mod:`.distill_losses`), each weighted by its ``weight``:

- ``encoder_matching``: ``lambda_mse * MSE + lambda_kl * spatial KL(T)`` of the student's image
  embedding (B, C, E, E) against the teacher's, mean over images;
- ``decoder_matching``: for every student prediction matched to a teacher mask,
  ``lambda_mse * MSE + lambda_cos * (1 - cos) + lambda_kl * channel KL(T)`` of the student's
  mask-decoder output token against the teacher's token of that mask; averaged over the pairs of
  the mini-batch (count all-reduced under DDP). The pairs are the strategy's student <-> teacher
  matching when it made one for this teacher (replace_gt, dual_supervision), otherwise a
  Hungarian student <-> teacher matching on IoU with ``mask_teacher.iou_threshold``
  (:func:`~maskteacher.train.teacher_match.match_to_teacher`);
- ``attention_matching``: ``lambda * KL(T)`` of the attention-transfer maps, mean over images;
- ``relational_KD``: ``lambda * (dist_factor * RKD-distance + angle_factor * RKD-angle)`` of the
  spatially mean-pooled embeddings across the images of the micro-batch (per rank under DDP);
  it needs >= 3 images per micro-batch and is exactly 0 with fewer (a warning at start-up when
  ``train.batch_size`` < 3).

Teachers: without ``teachers`` entries, the one teacher is the mask teacher (its cache at
``mask_teacher.cache_path``, read with the batch by the DataLoader workers, or the online
teacher); each ``teachers`` entry is one teacher with its own ``cache_path`` and weight
(:func:`maskteacher.config.teacher_weights`), read per batch in the training process (an entry
whose cache is the mask teacher's is read with the batch). Each teacher's blocks appear as terms
``kd/<teacher>/<block>`` weighted ``lambda_coef * teacher weight * block weight``; the epoch's
``stage_schedule`` may switch the whole block off (``distillation``) or change ``lambda_coef``.

Checks at start-up (one line each): a block needs a field the cache lacks -> names the
``precompute.store`` flag; a ``teachers`` entry without ``cache_path``; ``train.hflip`` with
distillation (the cached embedding and tokens describe the unflipped image and a 16-pixel
embedding grid cannot be mirrored within an unpadded width that is no multiple of 16: refused
rather than approximated). At the first step: student and teacher embeddings or tokens of
different shapes (channels, spatial size) are an error naming both shapes -- never broadcast.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from maskteacher.cache_format import dataset_fingerprint
from maskteacher.config import Config, TeacherEntry, resolve_teacher_type, teacher_weights
from maskteacher.errors import UserError
from maskteacher.train import distill_losses as dl
from maskteacher.train.batch import Batch, TeacherTargets
from maskteacher.train.builders import open_images
from maskteacher.train.cache_targets import check_store
from maskteacher.train.criterion import pair_normaliser
from maskteacher.train.forward import Predictions
from maskteacher.train.supervision import (
    StepContext,
    SupervisionOutput,
    image_predictions,
    register_aux_loss,
)
from maskteacher.train.teacher_cache import (
    CacheTeacherReader,
    TeacherIdentity,
    check_cache_identity,
    generation_params,
    open_teacher_cache,
)
from maskteacher.train.teacher_match import (
    TeacherSupervisionOutput,
    match_to_teacher,
    teacher_masks,
)

log = logging.getLogger(__name__)

#: Teacher fields each block reads.
BLOCK_FIELDS: dict[str, frozenset[str]] = {
    "encoder_matching": frozenset({"embedding"}),
    "decoder_matching": frozenset({"logits", "tokens"}),
    "attention_matching": frozenset({"embedding"}),
    "relational_KD": frozenset({"embedding"}),
}
#: Name of the teacher when there are no ``teachers`` entries (the mask teacher).
MASK_TEACHER = "mask_teacher"

# ------------------------------------------------------------------------------ config -> plan


def kd_may_run(cfg: Config) -> bool:
    """Whether distillation is on in any epoch (``distillation.enable`` or a stage turning it on)."""
    return cfg.distillation.enable or any(s.distillation for s in cfg.stage_schedule)


def enabled_blocks(cfg: Config) -> list[str]:
    """Names (:data:`BLOCK_FIELDS` keys) of the blocks with ``enable: true``."""
    return [name for name in BLOCK_FIELDS if getattr(cfg.distillation, name).enable]


def kd_fields(cfg: Config) -> frozenset[str]:
    """Teacher fields the enabled blocks read (empty when distillation never runs)."""
    if not kd_may_run(cfg):
        return frozenset()
    return frozenset().union(*(BLOCK_FIELDS[b] for b in enabled_blocks(cfg)))


@dataclass(frozen=True)
class KDTeacher:
    """One distillation teacher: name, weight, and its own cache (None: the batch's teacher)."""

    name: str
    weight: float
    cache_path: str | None = None
    entry: TeacherEntry | None = None
    index: int | None = None  # position in ``teachers``


def _same_path(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def kd_teachers(cfg: Config) -> list[KDTeacher]:
    """The distillation teachers (module docstring)."""
    if not cfg.teachers:
        return [KDTeacher(MASK_TEACHER, 1.0)]
    out = []
    for index, (entry, weight) in enumerate(zip(cfg.teachers, teacher_weights(cfg.teachers))):
        if not entry.cache_path:
            raise UserError(
                f"teachers '{entry.name}': cache_path is not set; feature distillation reads "
                f"this teacher's outputs from its cache (maskteacher precompute CONFIG --teacher "
                f"{entry.name} writes it)"
            )
        shared = _same_path(entry.cache_path, cfg.mask_teacher.cache_path)
        path = None if shared else entry.cache_path
        out.append(KDTeacher(entry.name, weight, path, entry, index))
    return out


def batch_teacher_fields(cfg: Config) -> frozenset[str]:
    """Fields distillation reads from the batch's (mask) teacher."""
    fields = kd_fields(cfg)
    if not fields or not enabled_blocks(cfg):
        return frozenset()
    if any(t.cache_path is None for t in kd_teachers(cfg)):
        return fields
    return frozenset()


# ------------------------------------------------------------------------------ block settings


@dataclass(frozen=True)
class EncoderBlock:
    lambda_mse: float
    lambda_kl: float
    temperature: float
    weight: float


@dataclass(frozen=True)
class DecoderBlock:
    lambda_mse: float
    lambda_cos: float
    lambda_kl: float
    temperature: float
    weight: float
    iou_threshold: float


@dataclass(frozen=True)
class AttentionBlock:
    lambda_: float
    temperature: float
    weight: float


@dataclass(frozen=True)
class RelationalBlock:
    lambda_: float
    dist_factor: float
    angle_factor: float
    weight: float


@dataclass(frozen=True)
class KDBlocks:
    """The enabled blocks' settings (None: block off)."""

    encoder: EncoderBlock | None = None
    decoder: DecoderBlock | None = None
    attention: AttentionBlock | None = None
    relational: RelationalBlock | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> KDBlocks:
        d = cfg.distillation
        e, dm, a, r = d.encoder_matching, d.decoder_matching, d.attention_matching, d.relational_KD
        blocks = cls()
        if e.enable:
            encoder = EncoderBlock(e.lambda_mse, e.lambda_kl, e.temperature, e.weight)
            blocks = dataclasses.replace(blocks, encoder=encoder)
        if dm.enable:
            decoder = DecoderBlock(
                dm.lambda_mse, dm.lambda_cos, dm.lambda_kl, dm.temperature, dm.weight,
                iou_threshold=cfg.mask_teacher.iou_threshold,
            )  # fmt: skip
            blocks = dataclasses.replace(blocks, decoder=decoder)
        if a.enable:
            attention = AttentionBlock(a.lambda_, a.temperature, a.weight)
            blocks = dataclasses.replace(blocks, attention=attention)
        if r.enable:
            relational = RelationalBlock(r.lambda_, r.dist_factor, r.angle_factor, r.weight)
            blocks = dataclasses.replace(blocks, relational=relational)
        return blocks


# ------------------------------------------------------------------------------ block losses


def _shape_error(block: str, what: str, student: torch.Tensor, teacher: torch.Tensor, name: str):
    return UserError(
        f"distillation.{block}: the student's {what} is {tuple(student.shape[1:])} but teacher "
        f"'{name}' gives {tuple(teacher.shape[1:])}; they must match (same channels and "
        "model.image_size) -- pick a student/teacher pair of equal width or disable the block"
    )


def encoder_loss(
    student: torch.Tensor, teacher: torch.Tensor, block: EncoderBlock, *, name: str = "teacher"
) -> torch.Tensor:
    """(B, C, E, E) embeddings -> () ``mean_b(lambda_mse * MSE + lambda_kl * KL)``."""
    if student.shape[1:] != teacher.shape[1:]:
        raise _shape_error("encoder_matching", "image embedding", student, teacher, name)
    per_image = block.lambda_mse * dl.feature_mse(student, teacher)
    if block.lambda_kl:
        per_image = per_image + block.lambda_kl * dl.spatial_kl(
            student, teacher, temperature=block.temperature
        )
    return per_image.mean()


def attention_loss(
    student: torch.Tensor, teacher: torch.Tensor, block: AttentionBlock, *, name: str = "teacher"
) -> torch.Tensor:
    """(B, Cs, E, E), (B, Ct, E, E) embeddings -> () ``lambda * mean_b KL``."""
    if student.shape[2:] != teacher.shape[2:]:
        raise _shape_error("attention_matching", "embedding grid", student, teacher, name)
    return block.lambda_ * dl.attention_kl(student, teacher, temperature=block.temperature).mean()


def relational_loss(
    student: torch.Tensor, teacher: torch.Tensor, block: RelationalBlock
) -> torch.Tensor:
    """(B, Cs, E, E), (B, Ct, E', E') embeddings -> () RKD of the spatially pooled vectors."""
    s = student.float().mean(dim=(2, 3))
    t = teacher.float().mean(dim=(2, 3))
    return block.lambda_ * (
        block.dist_factor * dl.rkd_distance(s, t) + block.angle_factor * dl.rkd_angle(s, t)
    )


def decoder_pair_loss(
    student: torch.Tensor, teacher: torch.Tensor, block: DecoderBlock, *, name: str = "teacher"
) -> torch.Tensor:
    """(N, C) matched token pairs -> (N,) ``lambda_mse * MSE + lambda_cos * (1 - cos) + lambda_kl * KL``."""
    if student.shape[1:] != teacher.shape[1:]:
        raise _shape_error("decoder_matching", "decoder token", student, teacher, name)
    per_pair = block.lambda_mse * dl.token_mse(student, teacher)
    per_pair = per_pair + block.lambda_cos * dl.cosine_loss(student, teacher)
    if block.lambda_kl:
        per_pair = per_pair + block.lambda_kl * dl.channel_kl(
            student, teacher, temperature=block.temperature
        )
    return per_pair


# ------------------------------------------------------------------------------ the aux loss

TeacherSource = Callable[[Batch], list[TeacherTargets]]


def _batch_teacher(batch: Batch) -> list[TeacherTargets]:
    if batch.teacher is None:
        raise RuntimeError("the batch carries no teacher outputs (distillation declared them)")
    return batch.teacher


@dataclass
class _Teacher:
    name: str
    weight: float
    source: TeacherSource
    from_batch: bool


class FeatureDistillation:
    """The distillation block as an :class:`~maskteacher.train.supervision.AuxLoss`.

    teachers: (name, weight, source) of each teacher -- ``source(batch)`` gives its B
    :class:`TeacherTargets`; blocks: the enabled blocks; batch_fields: what the batch's teacher
    must carry.
    """

    def __init__(
        self, *, teachers: list[_Teacher], blocks: KDBlocks, batch_fields: frozenset[str]
    ) -> None:
        self.teachers = teachers
        self.blocks = blocks
        self.teacher_fields = batch_fields
        self.needs_tokens = blocks.decoder is not None

    def __call__(
        self, preds: Predictions, batch: Batch, ctx: StepContext, supervision: SupervisionOutput
    ) -> SupervisionOutput:
        if not ctx.settings.distillation:
            return SupervisionOutput(terms={}, weights={})
        terms: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        with torch.autocast(batch.images.device.type, enabled=False):
            for teacher in self.teachers:
                found = self._teacher_terms(teacher, preds, batch, ctx, supervision)
                for block, (value, block_weight) in found.items():
                    key = f"kd/{teacher.name}/{block}"
                    terms[key] = value
                    weights[key] = ctx.settings.lambda_coef * teacher.weight * block_weight
        return SupervisionOutput(terms=terms, weights=weights)

    def _teacher_terms(self, teacher: _Teacher, preds, batch, ctx, supervision):
        b = self.blocks
        targets = teacher.source(batch)
        out: dict[str, tuple[torch.Tensor, float]] = {}
        if b.encoder or b.attention or b.relational:
            t_emb = torch.stack([t.embedding for t in targets]).to(preds.embeddings.device).float()
            s_emb = preds.embeddings.float()
            if b.encoder:
                out["encoder"] = (
                    encoder_loss(s_emb, t_emb, b.encoder, name=teacher.name),
                    b.encoder.weight,
                )
            if b.attention:
                out["attention"] = (
                    attention_loss(s_emb, t_emb, b.attention, name=teacher.name),
                    b.attention.weight,
                )
            if b.relational:
                out["relational"] = (
                    relational_loss(s_emb, t_emb, b.relational),
                    b.relational.weight,
                )
        if b.decoder:
            out["decoder"] = (
                self._decoder(teacher, targets, preds, batch, ctx, supervision),
                b.decoder.weight,
            )
        return out

    def _decoder(self, teacher, targets, preds, batch, ctx, supervision) -> torch.Tensor:
        block = self.blocks.decoder
        images = image_predictions(preds, batch)
        matches = None
        if teacher.from_batch and isinstance(supervision, TeacherSupervisionOutput):
            matches = supervision.teacher_matches
        if matches is None:
            masks = [
                teacher_masks(t.float_logits(), batch.input_hw[i]) for i, t in enumerate(targets)
            ]
            matches = match_to_teacher(images, masks, iou_threshold=block.iou_threshold)
        s_tok, t_tok = [], []
        for img, t, m in zip(images, targets, matches):
            device = img.tokens.device
            s_tok.append(img.tokens.index_select(0, m.pred.to(device)))
            t_tok.append(t.tokens.to(device).index_select(0, m.target.to(device)))
        s = torch.cat(s_tok)
        t = torch.cat(t_tok).float()
        per_pair = decoder_pair_loss(s, t, block, name=teacher.name)
        return per_pair.sum() / pair_normaliser(ctx.reduce_count(per_pair.shape[0]))


# ------------------------------------------------------------------------------ builder


def _entry_identity(cfg: Config, entry: TeacherEntry, index: int) -> TeacherIdentity:
    key = f"teachers[{index}]"
    return TeacherIdentity(
        where=f"{key}.cache_path",
        teacher_type=resolve_teacher_type(entry),
        type_key=f"{key}.type",
        checkpoint=entry.checkpoint,
        checkpoint_key=f"{key}.checkpoint",
        image_size=cfg.model.image_size,
        generation=generation_params(cfg.precompute),
    )


def _cache_reader(cfg: Config, teacher: KDTeacher, fields: frozenset[str]) -> TeacherSource:
    """Open, check and wrap one teacher's own cache (module docstring)."""
    identity = _entry_identity(cfg, teacher.entry, teacher.index)
    path = teacher.cache_path
    header = check_cache_identity(path, identity)
    check_store(header, fields, where=identity.where, path=path)
    if cfg.dataset.train_dataset is not None:
        images = open_images(cfg, cfg.dataset.train_dataset, "train_dataset")
        want = dataset_fingerprint(images.fingerprint_entries())
        have = header.fingerprints.get("train")
        if have != want:
            raise UserError(
                f"{identity.where} {path}: dataset fingerprint of split 'train' is {have} in the "
                f"cache but {want} for {cfg.dataset.train_dataset} (the cache was made for other "
                "data, or the data changed since)"
            )
    reader = CacheTeacherReader(
        open_teacher_cache(path, where=identity.where),
        fields=fields,
        split="train",
        where=identity.where,
    )
    return lambda batch: reader(batch.image_ids, batch.images.device)


@register_aux_loss
def feature_kd_from_config(cfg: Config) -> FeatureDistillation | None:
    """The distillation block for ``cfg``, or None when it never runs (module docstring)."""
    if not kd_may_run(cfg):
        return None
    if not enabled_blocks(cfg):
        log.warning("distillation is enabled but none of its blocks is; it adds nothing")
        return None
    if cfg.train.hflip:
        raise UserError(
            "train.hflip: true cannot be combined with feature distillation: the teacher's "
            "cached image embedding and tokens describe the unflipped image; set train.hflip: "
            "false or turn distillation off"
        )
    blocks = KDBlocks.from_config(cfg)
    if blocks.relational is not None and cfg.train.batch_size < 3:
        log.warning(
            "distillation.relational_KD needs >= 3 images per micro-batch; with "
            "train.batch_size %d it is 0",
            cfg.train.batch_size,
        )
    fields = kd_fields(cfg)
    teachers = []
    for t in kd_teachers(cfg):
        if t.cache_path is None:
            teachers.append(_Teacher(t.name, t.weight, _batch_teacher, from_batch=True))
        else:
            teachers.append(_Teacher(t.name, t.weight, _cache_reader(cfg, t, fields), False))
    return FeatureDistillation(
        teachers=teachers, blocks=blocks, batch_fields=batch_teacher_fields(cfg)
    )
