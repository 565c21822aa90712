"""Datasets (folder / SA-1B / COCO readers), frame transforms and the synthetic sample maker.

A leaf package: imports nothing from maskteacher except ``errors``.
"""

from maskteacher.data.dataset import Sample, SegmentationDataset
from maskteacher.data.fingerprint import FINGERPRINT_MISMATCH_HINT, FINGERPRINT_VERSION
from maskteacher.data.images import read_image
from maskteacher.data.readers import DATASET_FORMATS, detect_format, open_dataset
from maskteacher.data.sample import generate_sample, make_sample, sample_image_id
from maskteacher.data.stats import DatasetStats, dataset_stats
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

__all__ = [
    "DATASET_FORMATS",
    "FINGERPRINT_MISMATCH_HINT",
    "FINGERPRINT_VERSION",
    "DatasetStats",
    "Sample",
    "SegmentationDataset",
    "dataset_stats",
    "detect_format",
    "generate_sample",
    "hflip_input",
    "hflip_lowres",
    "hflip_points",
    "input_size",
    "lowres_size",
    "lowres_valid_hw",
    "make_sample",
    "masks_to_lowres",
    "open_dataset",
    "point_grid",
    "read_image",
    "resize_image",
    "sample_image_id",
    "to_model_input",
]
