"""
COCO instances files as datasets, and the checks run on every dataset before training: bad input
fails at once, naming the file and the fix, not in a data-loader worker or the final evaluation.
"""

import difflib
import functools
import json
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.structures import BoxMode
from detectron2.structures.masks import polygon_area
from PIL import Image

from ..config import InputError

logger = logging.getLogger(__name__)

# Metadata key of a dataset re-registered by drop_invalid_annotations: the file it was filtered
# from. Its "json_file" is unset, so that COCOEvaluator builds the ground truth from the dicts.
_UNFILTERED_JSON_KEY = "unfiltered_json_file"


def register_coco_datasets(specs: Iterable[Sequence[str]]) -> None:
    """
    ``register_coco_instances`` for each ``(name, json_file, image_root)`` of ``--register-coco``.
    A name registered again with the same files is left as it is, so every process can call this.
    """
    specs = [tuple(spec) for spec in specs]
    names = [name for name, _, _ in specs]
    for name, json_file, image_root in specs:
        if names.count(name) > 1:
            raise InputError(
                f"Dataset {name!r} is given to --register-coco more than once. Give each dataset "
                f"its own name."
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
            registered = (_json_file(name), MetadataCatalog.get(name).get("image_root", None))
            if registered == (json_file, image_root):
                continue
        else:
            try:
                register_coco_instances(name, {}, json_file, image_root)
                continue
            except AssertionError:  # the metadata, kept after DatasetCatalog.remove, differs
                DatasetCatalog.remove(name)
        raise InputError(
            f"Dataset name {name!r} is a built-in dataset name (registered with other files or "
            f"classes). Choose another name for --register-coco, e.g. my_{name}."
        )


def dataset_num_classes(dataset_name: str) -> int:
    """
    The length of a registered dataset's ``thing_classes``, or of the ``categories`` of its
    COCO file when not set yet (what ``load_coco_json`` would set them to).
    """
    json_file = _json_file(dataset_name)
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if not classes and json_file is not None and os.path.isfile(json_file):
        # Not loaded: the invalid annotations that --drop-invalid-annotations drops must not fail.
        classes = _read_json(json_file, dataset_name).get("categories")
    elif not classes:
        _load(dataset_name)
        classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if not classes:
        raise InputError(
            f"Dataset {dataset_name!r} has no 'thing_classes' in its metadata, so its number of "
            f"classes is unknown. Set MODEL.RETINANET.NUM_CLASSES in the config."
        )
    return len(classes)


def check_datasets(
    dataset_names: Iterable[str], num_classes: int, training: Iterable[str] = ()
) -> None:
    """
    :func:`load_checked_dataset` on each dataset, before training starts; and for those of them
    named in ``training``, that some image has an object to train on (detectron2's loader leaves
    out the images without one, and stops with an AssertionError when none is left).
    """
    dicts = {name: load_checked_dataset(name, num_classes) for name in dataset_names}
    objects = (
        annotation
        for name in training
        for record in dicts[name]
        for annotation in record.get("annotations", [])
        if not annotation.get("iscrowd", 0)
    )
    if training and next(objects, None) is None:
        raise InputError(
            f"No image of DATASETS.TRAIN {tuple(training)} has an object to train on (no "
            "annotations, or only crowd regions). Add the objects' annotations to its file."
        )


def load_checked_dataset(dataset_name: str, num_classes: int) -> List[Dict]:
    """
    ``DatasetCatalog.get(dataset_name)``, checked for: a missing or unparsable annotation file,
    no images, missing or empty image files, image files that do not decode (every one, see
    :func:`_decode_problem`), invalid annotations (see :func:`_annotation_problem`) and category
    ids outside ``[0, num_classes)``. Each raises an InputError naming the file (and annotation)
    and the fix.
    """
    source = _json_file(dataset_name) or f"the loader of {dataset_name!r}"
    json_file = MetadataCatalog.get(dataset_name).get("json_file", None)  # None after a drop
    # load_coco_json silently leaves out polygons of fewer than 3 points, which the evaluation
    # still reads from the file, and fails on a category id not in 'categories' without naming
    # the annotation: only the file shows every annotation.
    has_file = json_file is not None and os.path.isfile(json_file)
    if has_file:
        coco = _read_json(json_file, dataset_name)
        _raise_if_invalid(dataset_name, source, _invalid_annotations(coco))
    dicts = _load(dataset_name)
    if not dicts:
        raise InputError(
            f"Dataset {dataset_name!r} has no images (loaded from {source}). Add entries to its "
            f"'images' list, or check that the file is the one you meant to register."
        )
    files = [record["file_name"] for record in dicts]
    missing = [path for path in files if not os.path.isfile(path)]
    empty = [path for path in files if os.path.isfile(path) and os.path.getsize(path) == 0]
    for problem, bad in (("missing", missing), ("empty", empty)):
        if bad:
            raise InputError(
                f"{len(bad)} image file(s) of dataset {dataset_name!r} ({source}) are {problem}: "
                f"{_listed(bad, ', ')}. Check its registered image root, or restore the files."
            )
    with ThreadPoolExecutor() as pool:  # Pillow decodes without holding the GIL
        undecodable = [problem for problem in pool.map(_decode_problem, files) if problem]
    if undecodable:
        raise InputError(
            f"{len(undecodable)} image file(s) of dataset {dataset_name!r} ({source}) cannot be "
            f"decoded: {_listed(undecodable, '; ')}. Replace them with valid image files, or "
            f"remove their entries from the dataset's images."
        )
    if not has_file:  # a dataset with its own loader (or dropped annotations): check the dicts
        _raise_if_invalid(dataset_name, source, _invalid_annotations(dicts=dicts))

    metadata = MetadataCatalog.get(dataset_name)
    thing_classes = metadata.get("thing_classes", None)
    # detectron2 maps a COCO file's category ids to class indices 0..C-1; name the file's id.
    file_ids = {v: k for k, v in metadata.get("thing_dataset_id_to_contiguous_id", {}).items()}
    for record in dicts:
        for annotation in record.get("annotations", []):
            category_id = annotation.get("category_id")
            if not isinstance(category_id, int) or not 0 <= category_id < num_classes:
                known = f"; the dataset has {len(thing_classes)}" if thing_classes else ""
                which = f"class index {category_id!r}"
                if category_id in file_ids:
                    which = f"category id {file_ids[category_id]} ({which})"
                raise InputError(
                    f"Dataset {dataset_name!r} ({source}): image {record['file_name']} has "
                    f"{which}, outside [0, {num_classes}) for a model of {num_classes} "
                    f"classes{known}. Set MODEL.RETINANET.NUM_CLASSES to the dataset's, or fix "
                    f"the annotation."
                )
    return dicts


def _decode_problem(path: str) -> Optional[str]:
    """
    ``"<path> (<error>)"`` if Pillow, which detectron2's ``read_image`` uses, cannot decode the
    image, else None. A JPEG is decoded at 1/8 scale (Pillow's draft mode): every byte of its
    compressed data is still read and entropy-decoded, so a truncated or corrupt file fails as
    in full decoding, for a fraction of the time.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except Exception as e:
        return f"{path} ({' '.join(str(e).split()) or type(e).__name__})"
    return None


def drop_invalid_annotations(dataset_names: Iterable[str]) -> Dict[str, int]:
    """
    Re-register each dataset whose COCO instances file has invalid annotations (see
    :func:`_annotation_problem`) to load without them, with the same metadata less "json_file",
    so that :class:`COCOEvaluator` evaluates against the filtered dicts too. Deterministic and
    idempotent, so every process of a launch calls it. Returns {name: annotations dropped}.
    """
    counts = {}
    for name in dataset_names:
        json_file, metadata = _json_file(name), MetadataCatalog.get(name)
        if json_file is None or metadata.get("image_root", None) is None:
            raise InputError(
                f"Dataset {name!r} is not loaded from a COCO instances file, so "
                f"--drop-invalid-annotations cannot filter it. Fix its annotations instead."
            )
        if not os.path.isfile(json_file):
            _load(name)  # raises the error that names the missing file
        invalid = _invalid_annotations(_read_json(json_file, name))
        invalid_ids = frozenset(annotation_id for _, annotation_id, _ in invalid)
        counts[name] = len(invalid_ids)
        logger.info(f"Dropped {len(invalid_ids)} invalid annotation(s) of {name} ({json_file}).")
        if not invalid_ids:
            continue
        fields = metadata.as_dict()
        for key in ("name", "json_file", _UNFILTERED_JSON_KEY):
            fields.pop(key, None)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        args = (json_file, fields["image_root"], name, invalid_ids)
        DatasetCatalog.register(name, functools.partial(_load_coco_json_without, *args))
        MetadataCatalog.get(name).set(**fields, **{_UNFILTERED_JSON_KEY: json_file})
    return counts


def _load_coco_json_without(json_file, image_root, dataset_name, annotation_ids) -> List[Dict]:
    coco = _read_json(json_file, dataset_name)
    coco["annotations"] = [a for a in coco["annotations"] if a.get("id") not in annotation_ids]
    # load_coco_json reads a file; the filtered copy lives only for the call, in each process.
    with tempfile.TemporaryDirectory() as directory:
        filtered = os.path.join(directory, os.path.basename(json_file))
        with open(filtered, "w") as f:
            json.dump(coco, f)
        return load_coco_json(filtered, image_root, dataset_name)


def _invalid_annotations(coco=None, dicts=()) -> List[Tuple[str, object, str]]:
    """
    ``[(file_name, annotation id, problem)]``, in order, of the invalid annotations of a parsed
    COCO instances file (those of images not in 'images' skipped, as by ``load_coco_json``), or
    else of dataset dicts, where an annotation without id is named by its index, ``#i``.
    """
    category_ids = None
    if coco is not None:
        images = {image.get("id"): image for image in coco.get("images", [])}
        category_ids = {category["id"] for category in coco.get("categories", [])}
        annotations = [
            (images[a["image_id"]], a.get("id"), a)
            for a in coco.get("annotations", [])
            if a.get("image_id") in images
        ]
    else:
        annotations = [
            (record, a.get("id", f"#{i}"), a)
            for record in dicts
            for i, a in enumerate(record.get("annotations", []))
        ]
    return [
        (image.get("file_name"), annotation_id, problem)
        for image, annotation_id, a in annotations
        if (problem := _annotation_problem(a, image, category_ids)) is not None
    ]


def _annotation_problem(annotation, image, category_ids=None) -> Optional[str]:
    """
    What is wrong with an annotation (of a COCO file, or dataset dicts with "bbox_mode") of an
    image (dict with "width" and "height"), if anything: a polygon of fewer than 3 points, an odd
    number of coordinates or zero area; a box missing, with width or height <= 0, outside the
    image or more than a pixel beyond it; a category id not in ``category_ids`` (if given).
    """
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not isinstance(polygon, (list, tuple)):
                return "segmentation is not a list of polygons (lists of x, y coordinates)"
            if len(polygon) < 6:
                return f"polygon of {len(polygon) // 2} point(s) (fewer than 3)"
            if len(polygon) % 2:
                return f"polygon with an odd number ({len(polygon)}) of coordinates"
            # Collinear float points leave a rounding residue, not exactly 0.
            if polygon_area(np.asarray(polygon[0::2]), np.asarray(polygon[1::2])) < 1e-6:
                return "polygon of zero area"
    bbox, mode = annotation.get("bbox"), annotation.get("bbox_mode", BoxMode.XYWH_ABS)
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return f"box {bbox!r} is not [x, y, width, height]"
    if mode not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        return None  # only the polygons of boxes in another mode are checked
    x, y, w, h = BoxMode.convert(list(bbox), mode, BoxMode.XYWH_ABS)
    width, height = image.get("width"), image.get("height")
    if w <= 0 or h <= 0:
        return f"box {[x, y, w, h]} has a width or height <= 0"
    if width is not None and height is not None:
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            return f"box {[x, y, w, h]} lies outside the {width}x{height} image"
        if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            return f"box {[x, y, w, h]} extends more than a pixel beyond the {width}x{height} image"
    if category_ids is not None and annotation.get("category_id") not in category_ids:
        return f"category id {annotation.get('category_id')!r} is not in 'categories'"
    return None


def _raise_if_invalid(dataset_name, source, invalid) -> None:
    if invalid:
        listed = [f"image {file} annotation {id}: {problem}" for file, id, problem in invalid]
        raise InputError(
            f"Dataset {dataset_name!r} ({source}) has {len(invalid)} invalid annotation(s): "
            f"{_listed(listed, '; ')}. Fix them, or pass --drop-invalid-annotations to leave "
            f"them out of training and evaluation."
        )


def _listed(items: List[str], separator: str) -> str:
    """The first 5 items, then how many more."""
    more = f"{separator}and {len(items) - 5} more" if len(items) > 5 else ""
    return separator.join(items[:5]) + more


def _json_file(dataset_name: str) -> Optional[str]:
    """The annotation file of a registered dataset (before a drop), or None; InputError if none."""
    registered = DatasetCatalog.list()
    if dataset_name not in registered:
        close = difflib.get_close_matches(dataset_name, registered, n=1, cutoff=0.8)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(
            f"Dataset {dataset_name!r} is not registered.{hint} Register it with --register-coco "
            f"NAME JSON IMAGE_DIR, or import retinamask_d2.data for the synthetic_shapes "
            f"datasets; DatasetCatalog.list() gives the {len(registered)} registered names."
        )
    metadata = MetadataCatalog.get(dataset_name)
    return metadata.get(_UNFILTERED_JSON_KEY, None) or metadata.get("json_file", None)


def _read_json(json_file: str, dataset_name: str) -> Dict:
    try:
        with open(json_file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(
            f"Annotation file {json_file} of dataset {dataset_name!r} is not valid JSON: {e.msg} "
            f"at line {e.lineno}, column {e.colno}. Fix, regenerate or download the file again."
        ) from e


def _load(dataset_name: str) -> List[Dict]:
    """``DatasetCatalog.get``, with the errors of a bad annotation file as InputError."""
    json_file = _json_file(dataset_name)
    source = json_file or f"the loader of {dataset_name!r}"
    try:
        return DatasetCatalog.get(dataset_name)
    except FileNotFoundError as e:
        # Only a missing annotation file is named here; any other missing file is re-raised.
        if json_file is None or os.path.isfile(json_file):
            raise
        raise InputError(
            f"Annotation file {json_file} of dataset {dataset_name!r} does not exist. Check the "
            f"path it was registered with (and $DETECTRON2_DATASETS for the built-in datasets)."
        ) from e
    except (KeyError, AssertionError) as e:
        if "thing_classes" in str(e) and "cannot be set to a different value" in str(e):
            # A built-in name (e.g. coco_2017_val) keeps COCO's classes in MetadataCatalog after
            # it is removed from DatasetCatalog and registered again with another file.
            raise InputError(
                f"Dataset {dataset_name!r} already has other classes in its metadata (it is a "
                f"built-in dataset name) than {source}. Register the file under a new name "
                f"(--register-coco NAME JSON IMAGE_DIR)."
            ) from None
        raise InputError(
            f"Annotation file {source} of dataset {dataset_name!r} is not a valid COCO instances "
            f"file: {' '.join(str(e).split())}. Fix its 'categories', 'images' and 'annotations'."
        ) from e
