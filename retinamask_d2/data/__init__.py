"""
Datasets of retinamask_d2. Importing this package registers ``synthetic_shapes_train`` and
``synthetic_shapes_val``; generate their files once, before training (see :mod:`.synthetic`).
"""

from .checks import check_datasets, dataset_num_classes, drop_invalid_annotations
from .checks import load_checked_dataset, register_coco_datasets
from .synthetic import SYNTHETIC_SHAPES_CLASSES, SYNTHETIC_SHAPES_NUM_CLASSES
from .synthetic import ensure_synthetic_dataset, generate_synthetic_shapes
from .synthetic import prepare_synthetic_datasets, register_synthetic_shapes

__all__ = [
    "check_datasets",
    "dataset_num_classes",
    "drop_invalid_annotations",
    "load_checked_dataset",
    "register_coco_datasets",
    "SYNTHETIC_SHAPES_CLASSES",
    "SYNTHETIC_SHAPES_NUM_CLASSES",
    "ensure_synthetic_dataset",
    "generate_synthetic_shapes",
    "prepare_synthetic_datasets",
    "register_synthetic_shapes",
]
