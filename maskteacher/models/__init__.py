"""SAM model registry, safe checkpoint loading, export, freezing and batched decoding.

Entry point: :func:`build_sam` (``MODEL_TYPES`` lists the registry). Every SAM model is a
``segment_anything.modeling.Sam`` (:class:`RegistrySam` adds ``model_type`` and ``image_size``),
so segment-anything's ``SamPredictor`` / ``SamAutomaticMaskGenerator`` run on any of them; the
SAM-HQ entries (``HQ_TYPES``) are ``segment_anything_hq.modeling.Sam`` models, for that
package's tools (:mod:`maskteacher.models.sam_hq`, :mod:`maskteacher.models.hq`).
"""

from maskteacher.models.backbone import detect_backbone
from maskteacher.models.build import build_sam
from maskteacher.models.checkpoint import (
    LoadReport,
    export_official,
    load_checkpoint,
    read_state_dict,
    sha256_file,
)
from maskteacher.models.decode import DecoderOutput, decode_points, preprocess
from maskteacher.models.freeze import set_batchnorm_eval, set_trainable
from maskteacher.models.hq import built_teacher_type, is_hq_model
from maskteacher.models.registry import (
    HQ_TYPES,
    HQ_VARIANTS,
    MODEL_TYPES,
    OFFICIAL_TYPES,
    SAM_TYPES,
    RegistrySam,
)

__all__ = [
    "HQ_TYPES",
    "HQ_VARIANTS",
    "MODEL_TYPES",
    "OFFICIAL_TYPES",
    "SAM_TYPES",
    "DecoderOutput",
    "LoadReport",
    "RegistrySam",
    "build_sam",
    "decode_points",
    "detect_backbone",
    "export_official",
    "is_hq_model",
    "load_checkpoint",
    "preprocess",
    "read_state_dict",
    "built_teacher_type",
    "set_batchnorm_eval",
    "set_trainable",
    "sha256_file",
]
