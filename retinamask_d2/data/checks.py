"""
Datasets given by the user as COCO instances files, and the checks run on every dataset before
training, so that bad input fails at once with a message naming the file and the fix, instead of
in a data-loader worker or in the final evaluation.
"""

import functools
import json
import logging
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode

from ..config import InputError

__all__ = [
    "check_datasets",
    "dataset_num_classes",
    "drop_invalid_annotations",
    "find_invalid_annotations",
    "load_checked_dataset",
    "register_coco_datasets",
]

logger = logging.getLogger(__name__)

# How many offending files or annotations a message lists before it only counts the rest.
_MAX_LISTED = 5

# Metadata key of a dataset re-registered by drop_invalid_annotations: the annotation file it
# was filtered from. Its "json_file" is left unset, so that COCOEvaluator builds the ground truth
# from the filtered dicts rather than reading the file with the invalid annotations.
_UNFILTERED_JSON_KEY = "unfiltered_json_file"

# (image file name, annotation id, what is wrong with the annotation)
InvalidAnnotation = Tuple[str, object, str]


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> None:
    """
    Register COCO instances files with detectron2's ``register_coco_instances`` (the
    ``--register-coco NAME JSON IMAGE_DIR`` flag of ``train_net.py``). Registering a name again
    with the same files does nothing, so that every process of a launch can call this.

    Args:
        specs: ``(name, json_file, image_root)`` triples.

    Raises:
        InputError: a missing file or directory, a name given twice, or a name already
            registered with other files (a built-in dataset name).
    """
    specs = [tuple(spec) for spec in specs]
    names = [name for name, _, _ in specs]
    for name, json_file, image_root in specs:
        if names.count(name) > 1:
            raise InputError(
                f"Dataset name {name!r} is given to --register-coco more than once. Give each "
                f"dataset its own name."
            )
        if not os.path.isfile(json_file):
            raise InputError(
                f"Annotation file {json_file} of --register-coco {name} does not exist. Pass the "
                f"path of a COCO instances JSON file."
            )
        if not os.path.isdir(image_root):
            raise InputError(
                f"Image directory {image_root} of --register-coco {name} does not exist. Pass "
                f"the directory that the 'file_name' entries of {json_file} are relative to."
            )
        if name in DatasetCatalog.list():
            if _registered_files(name) == _abspaths(json_file, image_root):
                continue
            raise _builtin_name_error(name)
        try:
            register_coco_instances(name, {}, json_file, image_root)
        except AssertionError:
            # Metadata of the name (kept after DatasetCatalog.remove) has another json_file.
            DatasetCatalog.remove(name)
            raise _builtin_name_error(name) from None


def dataset_num_classes(dataset_name: str) -> int:
    """
    The number of classes of a registered dataset: its ``thing_classes``, which
    ``load_coco_json`` sets when the dataset is loaded (loaded here if not set yet).

    Raises:
        InputError: the name is not registered, the dataset does not load, or it has no
            ``thing_classes``.
    """
    _require_registered(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    if not metadata.get("thing_classes", None):
        json_file = metadata.get("json_file", None)
        _load(dataset_name, json_file, _source(dataset_name))
    thing_classes = metadata.get("thing_classes", None)
    if not thing_classes:
        raise InputError(
            f"Dataset {dataset_name!r} has no 'thing_classes' in its metadata, so its number of "
            f"classes is unknown. Set MODEL.RETINANET.NUM_CLASSES in the config."
        )
    return len(thing_classes)


def check_datasets(dataset_names: Iterable[str], num_classes: int) -> None:
    """
    :func:`load_checked_dataset` on each dataset: run once, before training starts.

    Raises:
        InputError: the first problem found, naming the file and the fix.
    """
    for name in dataset_names:
        load_checked_dataset(name, num_classes)


def load_checked_dataset(dataset_name: str, num_classes: int) -> List[Dict]:
    """
    ``DatasetCatalog.get(dataset_name)``, checked for what would otherwise fail later or
    silently: an annotation file that is missing or not valid JSON, no images, missing or empty
    image files, a first image that does not decode, invalid annotations (see
    :func:`find_invalid_annotations`), and category ids outside ``[0, num_classes)``. Only the
    first image is decoded; the others are checked for existence and non-zero size, which keeps
    the check fast on large datasets.

    Args:
        dataset_name: a name registered in ``DatasetCatalog``.
        num_classes: the number of classes the model predicts (``MODEL.RETINANET.NUM_CLASSES``).

    Returns:
        list[dict]: the dataset dicts, as ``DatasetCatalog.get`` returns them.

    Raises:
        InputError: any of the above, naming the file (and image and annotation id) and the fix.
    """
    _require_registered(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    json_file = metadata.get("json_file", None)
    source = _source(dataset_name)

    dicts = _load(dataset_name, json_file, source)
    if len(dicts) == 0:
        raise InputError(
            f"Dataset {dataset_name!r} has no images (loaded from {source}). Add entries to its "
            f"'images' list, or check that the file is the one you meant to register."
        )
    _check_image_files(dataset_name, dicts, source)
    # load_coco_json silently leaves out polygons of fewer than 3 points, which the evaluation
    # still reads from the file: only the file shows every annotation.
    if json_file is not None and os.path.isfile(json_file):
        invalid = find_invalid_annotations(_read_json(json_file))
    else:
        invalid = _invalid_annotations_in_dicts(dicts)
    _raise_if_invalid(dataset_name, source, invalid)
    _check_category_ids(
        dataset_name, dicts, source, num_classes, metadata.get("thing_classes", None)
    )
    return dicts


def find_invalid_annotations(coco: Dict) -> List[InvalidAnnotation]:
    """
    The annotations of a COCO instances file that must not reach training: a polygon of fewer
    than 3 points (fewer than 6 numbers), an odd number of coordinates or zero area; a box
    (``bbox``, XYWH) missing or with a width or height <= 0, entirely outside its image or
    extending more than a pixel beyond it; a category id not in the file's ``categories``.
    Annotations of images absent from ``images`` are skipped (``load_coco_json`` skips them).

    Args:
        coco: the parsed JSON, with "images", "annotations" and "categories".

    Returns:
        list[(file_name, annotation_id, problem)]: in the order of the file's annotations;
        ``file_name`` as in the file, ``problem`` a short phrase.
    """
    images = {image.get("id"): image for image in coco.get("images", [])}
    category_ids = {category["id"] for category in coco.get("categories", [])}
    invalid = []
    for annotation in coco.get("annotations", []):
        image = images.get(annotation.get("image_id"))
        if image is None:
            continue
        problem = _annotation_problem(
            annotation.get("bbox"),
            annotation.get("segmentation"),
            image.get("width"),
            image.get("height"),
        )
        if problem is None and annotation.get("category_id") not in category_ids:
            problem = f"category id {annotation.get('category_id')!r} is not in 'categories'"
        if problem is not None:
            invalid.append((image.get("file_name"), annotation.get("id"), problem))
    return invalid


def drop_invalid_annotations(dataset_names: Iterable[str]) -> Dict[str, int]:
    """
    Re-register each dataset of a COCO instances file that has invalid annotations (see
    :func:`find_invalid_annotations`) so that its dicts leave them out; the other metadata stays.
    Its "json_file" is left unset so that :class:`COCOEvaluator` evaluates against the dicts
    too. Cheap and deterministic, so every process of a launch calls it; calling it again gives
    the same result.

    Returns:
        dict: dataset name -> number of annotations dropped.

    Raises:
        InputError: a dataset not registered, or not loaded from a COCO instances file.
    """
    counts = {}
    for name in dataset_names:
        _require_registered(name)
        metadata = MetadataCatalog.get(name)
        json_file = metadata.get(_UNFILTERED_JSON_KEY, None) or metadata.get("json_file", None)
        if json_file is None or metadata.get("image_root", None) is None:
            raise InputError(
                f"Dataset {name!r} is not loaded from a COCO instances file, so "
                f"--drop-invalid-annotations cannot filter it. Fix its annotations instead."
            )
        if not os.path.isfile(json_file):
            # A dataset generated on first use (synthetic_shapes) writes its file when loaded.
            _load(name, json_file, json_file)
        invalid_ids = frozenset(a for _, a, _ in find_invalid_annotations(_read_json(json_file)))
        counts[name] = len(invalid_ids)
        logger.info(f"Dropped {len(invalid_ids)} invalid annotation(s) of {name} ({json_file}).")
        if not invalid_ids:
            continue
        fields = {
            key: value
            for key, value in metadata.as_dict().items()
            if key not in ("name", "json_file", _UNFILTERED_JSON_KEY)
        }
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name,
            functools.partial(
                _load_coco_json_without, json_file, metadata.image_root, name, invalid_ids
            ),
        )
        MetadataCatalog.get(name).set(**fields, **{_UNFILTERED_JSON_KEY: json_file})
    return counts


def _load_coco_json_without(json_file, image_root, dataset_name, annotation_ids) -> List[Dict]:
    coco = _read_json(json_file)
    coco["annotations"] = [a for a in coco["annotations"] if a.get("id") not in annotation_ids]
    # load_coco_json reads a file; the filtered copy lives only for the call, in each process.
    with tempfile.TemporaryDirectory() as directory:
        filtered = os.path.join(directory, os.path.basename(json_file))
        with open(filtered, "w") as f:
            json.dump(coco, f)
        return load_coco_json(filtered, image_root, dataset_name)


def _annotation_problem(bbox, segmentation, width, height) -> Optional[str]:
    """What is wrong with a box (XYWH_ABS) and a segmentation in a width x height image."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not isinstance(polygon, (list, tuple)):
                return "segmentation is not a list of polygons (lists of x, y coordinates)"
            if len(polygon) < 6:
                return f"polygon of {len(polygon) // 2} point(s) (fewer than 3)"
            if len(polygon) % 2:
                return f"polygon with an odd number ({len(polygon)}) of coordinates"
            x, y = np.asarray(polygon[0::2], float), np.asarray(polygon[1::2], float)
            # Shoelace formula; collinear float points leave a rounding residue, not exactly 0.
            if abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) < 1e-6:
                return "polygon of zero area"
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"box {bbox!r} is not [x, y, width, height]"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"box {list(bbox)} has a width or height <= 0"
    if width is None or height is None:
        return None
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return f"box {list(bbox)} lies outside the {width}x{height} image"
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        return f"box {list(bbox)} extends more than a pixel beyond the {width}x{height} image"
    return None


def _invalid_annotations_in_dicts(dicts: List[Dict]) -> List[InvalidAnnotation]:
    # Datasets without an annotation file: detectron2's dataset dicts, with boxes in any mode.
    invalid = []
    for record in dicts:
        for index, annotation in enumerate(record.get("annotations", [])):
            bbox, mode = annotation.get("bbox"), annotation.get("bbox_mode")
            if mode == BoxMode.XYXY_ABS and bbox is not None and len(bbox) == 4:
                bbox = BoxMode.convert(list(bbox), mode, BoxMode.XYWH_ABS)
            elif mode != BoxMode.XYWH_ABS:
                bbox = [0, 0, 1, 1]  # another mode: only the polygons are checked
            problem = _annotation_problem(
                bbox, annotation.get("segmentation"), record.get("width"), record.get("height")
            )
            if problem is not None:
                annotation_id = annotation.get("id", f"#{index}")
                invalid.append((record.get("file_name"), annotation_id, problem))
    return invalid


def _raise_if_invalid(dataset_name, source, invalid: List[InvalidAnnotation]) -> None:
    if not invalid:
        return
    listed = "; ".join(
        f"image {file_name} annotation {annotation_id}: {problem}"
        for file_name, annotation_id, problem in invalid[:_MAX_LISTED]
    )
    more = f"; and {len(invalid) - _MAX_LISTED} more" if len(invalid) > _MAX_LISTED else ""
    raise InputError(
        f"Dataset {dataset_name!r} ({source}) has {len(invalid)} invalid annotation(s): "
        f"{listed}{more}. Fix the annotations, or rerun with --drop-invalid-annotations to leave "
        f"them out of training and evaluation."
    )


def _require_registered(dataset_name: str) -> None:
    if dataset_name not in DatasetCatalog.list():
        raise InputError(
            f"Dataset {dataset_name!r} is not registered. Registered datasets: "
            f"{', '.join(sorted(DatasetCatalog.list()))}. Register it (e.g. with "
            f"--register-coco NAME JSON IMAGE_DIR), or import the module that does "
            f"(retinamask_d2.data for the synthetic_shapes datasets)."
        )


def _source(dataset_name: str) -> str:
    metadata = MetadataCatalog.get(dataset_name)
    json_file = metadata.get(_UNFILTERED_JSON_KEY, None) or metadata.get("json_file", None)
    return json_file if json_file is not None else f"the loader of {dataset_name!r}"


def _registered_files(dataset_name: str) -> Tuple[str, str]:
    metadata = MetadataCatalog.get(dataset_name)
    json_file = metadata.get(_UNFILTERED_JSON_KEY, None) or metadata.get("json_file", None)
    image_root = metadata.get("image_root", None)
    return _abspaths(json_file, image_root) if json_file and image_root else None


def _abspaths(json_file: str, image_root: str) -> Tuple[str, str]:
    return os.path.abspath(json_file), os.path.abspath(image_root)


def _builtin_name_error(dataset_name: str) -> InputError:
    return InputError(
        f"Dataset name {dataset_name!r} is a built-in dataset name (already registered, with "
        f"other files or classes). Choose another name for --register-coco, e.g. "
        f"my_{dataset_name}."
    )


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _read_json(json_file: str) -> Dict:
    with open(json_file) as f:
        return json.load(f)


def _load(dataset_name: str, json_file, source: str) -> List[Dict]:
    try:
        return DatasetCatalog.get(dataset_name)
    except FileNotFoundError as e:
        # Synthetic datasets create their file while loading, so only a file still missing
        # afterwards is the annotation file's fault.
        if json_file is None or os.path.isfile(json_file):
            raise
        raise InputError(
            f"Annotation file {json_file} of dataset {dataset_name!r} does not exist. Check "
            f"the path given when the dataset was registered (and $DETECTRON2_DATASETS for "
            f"datasets under the default root)."
        ) from e
    except json.JSONDecodeError as e:
        raise InputError(
            f"Annotation file {source} of dataset {dataset_name!r} is not valid JSON: {e.msg} at "
            f"line {e.lineno}, column {e.colno} (character {e.pos}). Fix the file, or regenerate "
            f"or download it again."
        ) from e
    except KeyError as e:
        # detectron2's load_coco_json raises KeyError for a category id absent from the file's
        # 'categories' (without naming the annotation), and pycocotools for missing fields.
        if json_file is not None and os.path.isfile(json_file):
            _raise_if_invalid(dataset_name, source, find_invalid_annotations(_read_json(json_file)))
        raise InputError(
            f"Annotation file {source} of dataset {dataset_name!r} is not a valid COCO instances "
            f"file: {e.args[0] if e.args else e!r}. Fix its 'categories', 'images' and "
            f"'annotations' entries."
        ) from e
    except AssertionError as e:
        if "thing_classes" in str(e) and "cannot be set to a different value" in str(e):
            # A built-in name (e.g. coco_2017_val) keeps COCO's classes in MetadataCatalog after
            # it is removed from DatasetCatalog and registered again with another file.
            raise InputError(
                f"Dataset {dataset_name!r} already has other classes in its metadata (it is a "
                f"built-in dataset name), which differ from the categories of {source}. "
                f"Register the file under a new name (--register-coco NAME JSON IMAGE_DIR)."
            ) from None
        raise InputError(
            f"Annotation file {source} of dataset {dataset_name!r} is not a valid COCO instances "
            f"file: {_one_line(e)}. Fix the file."
        ) from e


def _check_image_files(dataset_name: str, dicts: List[Dict], source: str) -> None:
    missing, empty = [], []
    for record in dicts:
        file_name = record.get("file_name")
        if file_name is None:
            raise InputError(
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
            raise InputError(
                f"{len(files)} image file(s) of dataset {dataset_name!r} listed in {source} are "
                f"{problem}: {listed}{more}. Check the image root given when the dataset was "
                f"registered, or restore the files."
            )
    first = dicts[0]["file_name"]
    try:
        read_image(first)
    except Exception as e:
        raise InputError(
            f"Image file {first} of dataset {dataset_name!r} (listed in {source}) cannot be "
            f"decoded: {_one_line(e)}. Replace it with a valid image file."
        ) from e


def _check_category_ids(dataset_name, dicts, source, num_classes: int, thing_classes) -> None:
    for record in dicts:
        for annotation in record.get("annotations", []):
            category_id = annotation.get("category_id")
            if not isinstance(category_id, int) or not 0 <= category_id < num_classes:
                known = f"; the dataset has {len(thing_classes)} classes" if thing_classes else ""
                raise InputError(
                    f"Dataset {dataset_name!r} ({source}): an annotation of image "
                    f"{record['file_name']} has category id {category_id!r} (0-based), outside "
                    f"[0, {num_classes}) for a model with {num_classes} classes{known}. Set "
                    f"MODEL.RETINANET.NUM_CLASSES to the number of classes in the dataset, or fix "
                    f"the annotation."
                )
