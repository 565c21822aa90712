"""SAM model registry, safe checkpoint loading, export, freezing and batched decoding.

Entry point: :func:`build_sam` (``MODEL_TYPES`` lists the registry). Every model is a
``segment_anything.modeling.Sam`` (:class:`RegistrySam` adds ``model_type`` and ``image_size``),
so segment-anything's ``SamPredictor`` / ``SamAutomaticMaskGenerator`` run on any of them.
"""

from maskteacher.models.build import build_sam
from maskteacher.models.checkpoint import (
    LoadReport,
    detect_backbone,
    export_official,
    load_checkpoint,
    read_state_dict,
    sha256_file,
)
from maskteacher.models.decode import DecoderOutput, decode_points, preprocess
from maskteacher.models.freeze import set_batchnorm_eval, set_trainable
from maskteacher.models.registry import MODEL_TYPES, OFFICIAL_TYPES, RegistrySam

__all__ = [
    "MODEL_TYPES",
    "OFFICIAL_TYPES",
    "DecoderOutput",
    "LoadReport",
    "RegistrySam",
    "build_sam",
    "decode_points",
    "detect_backbone",
    "export_official",
    "load_checkpoint",
    "preprocess",
    "read_state_dict",
    "set_batchnorm_eval",
    "set_trainable",
    "sha256_file",
]
