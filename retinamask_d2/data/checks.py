"""
Validation of a registered dataset before training, so that bad input fails at once with a
message naming the file and the fix, instead of deep inside a data-loader worker.
"""

import json
import logging
import os
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image

__all__ = ["load_checked_dataset"]

logger = logging.getLogger(__name__)

# How many offending files a message lists before it only counts the rest.
_MAX_LISTED = 5


def load_checked_dataset(dataset_name: str, num_classes: int) -> List[Dict]:
    """
    ``DatasetCatalog.get(dataset_name)``, checked for what would otherwise fail later or
    silently: an annotation file that is missing or not valid JSON, no images, missing or empty
    image files, a first image that does not decode, and category ids outside
    ``[0, num_classes)``. Only the first image is decoded; the others are checked for existence
    and non-zero size, which keeps the check fast on large datasets.

    Args:
        dataset_name: a name registered in ``DatasetCatalog``.
        num_classes: the number of classes the model predicts (``MODEL.RETINANET.NUM_CLASSES``).

    Returns:
        list[dict]: the dataset dicts, as ``DatasetCatalog.get`` returns them.

    Raises:
        KeyError: the name is not registered.
        FileNotFoundError: the annotation file or an image file is missing.
        ValueError: anything else above.
    """
    if dataset_name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset {dataset_name!r} is not registered. Registered datasets: "
            f"{', '.join(sorted(DatasetCatalog.list()))}. Register it (e.g. with "
            f"detectron2.data.datasets.register_coco_instances), or import the module that does "
            f"(retinamask_d2.data for the synthetic_shapes datasets)."
        )
    metadata = MetadataCatalog.get(dataset_name)
    json_file = metadata.get("json_file", None)
    source = json_file if json_file is not None else f"the loader of {dataset_name!r}"

    dicts = _load(dataset_name, json_file, source)
    if len(dicts) == 0:
        raise ValueError(
            f"Dataset {dataset_name!r} has no images (loaded from {source}). Add entries to its "
            f"'images' list, or check that the file is the one you meant to register."
        )
    _check_image_files(dataset_name, dicts, source)
    _check_category_ids(
        dataset_name, dicts, source, num_classes, metadata.get("thing_classes", None)
    )
    return dicts


def _load(dataset_name: str, json_file, source: str) -> List[Dict]:
    try:
        return DatasetCatalog.get(dataset_name)
    except FileNotFoundError as e:
        # Synthetic datasets create their file while loading, so only a file still missing
        # afterwards is the annotation file's fault.
        if json_file is None or os.path.isfile(json_file):
            raise
        raise FileNotFoundError(
            f"Annotation file {json_file} of dataset {dataset_name!r} does not exist. Check "
            f"the path given when the dataset was registered (and $DETECTRON2_DATASETS for "
            f"datasets under the default root)."
        ) from e
    except json.JSONDecodeError as e:
        raise ValueError(
            f"Annotation file {source} of dataset {dataset_name!r} is not valid JSON: {e.msg} at "
            f"line {e.lineno}, column {e.colno} (character {e.pos}). Fix the file, or regenerate "
            f"or download it again."
        ) from e
    except KeyError as e:
        # detectron2's load_coco_json raises KeyError for a category id absent from the file's
        # 'categories', and pycocotools for missing fields.
        raise ValueError(
            f"Annotation file {source} of dataset {dataset_name!r} is not a valid COCO instances "
            f"file: {e.args[0] if e.args else e!r}. Fix its 'categories', 'images' and "
            f"'annotations' entries."
        ) from e
    except AssertionError as e:
        raise ValueError(
            f"Annotation file {source} of dataset {dataset_name!r} is not a valid COCO instances "
            f"file: {e}. Fix the file."
        ) from e


def _check_image_files(dataset_name: str, dicts: List[Dict], source: str) -> None:
    missing, empty = [], []
    for record in dicts:
        file_name = record.get("file_name")
        if file_name is None:
            raise ValueError(
                f"Dataset {dataset_name!r} ({source}) has a record without 'file_name' "
                f"(image id {record.get('image_id')}). Every image needs a file name."
            )
        if not os.path.isfile(file_name):
            missing.append(file_name)
        elif os.path.getsize(file_name) == 0:
            empty.append(file_name)
    for problem, files in (("missing", missing), ("empty", empty)):
        if files:
            listed = ", ".join(files[:_MAX_LISTED])
            more = f" and {len(files) - _MAX_LISTED} more" if len(files) > _MAX_LISTED else ""
            raise FileNotFoundError(
                f"{len(files)} image file(s) of dataset {dataset_name!r} listed in {source} are "
                f"{problem}: {listed}{more}. Check the image root given when the dataset was "
                f"registered, or restore the files."
            )
    first = dicts[0]["file_name"]
    try:
        read_image(first)
    except Exception as e:
        raise ValueError(
            f"Image file {first} of dataset {dataset_name!r} (listed in {source}) cannot be "
            f"decoded: {e}. Replace it with a valid image file."
        ) from e


def _check_category_ids(dataset_name, dicts, source, num_classes: int, thing_classes) -> None:
    for record in dicts:
        for annotation in record.get("annotations", []):
            category_id = annotation.get("category_id")
            if not isinstance(category_id, int) or not 0 <= category_id < num_classes:
                known = f"; the dataset has {len(thing_classes)} classes" if thing_classes else ""
                raise ValueError(
                    f"Dataset {dataset_name!r} ({source}): an annotation of image "
                    f"{record['file_name']} has category id {category_id!r} (0-based), outside "
                    f"[0, {num_classes}) for a model with {num_classes} classes{known}. Set "
                    f"MODEL.RETINANET.NUM_CLASSES to the number of classes in the dataset, or fix "
                    f"the annotation."
                )
