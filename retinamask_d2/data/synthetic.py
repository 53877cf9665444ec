"""
A small synthetic instance-segmentation dataset, "synthetic_shapes", generated deterministically
from a seed, so that RetinaMask can be trained from scratch and evaluated on a CPU in minutes.

Each image shows ellipses, rectangles, triangles, stars and thin bars (aspect ratio 8:1 to 20:1,
axis-aligned or at any angle) of very different sizes on a textured, noisy background. Later
shapes are drawn over earlier ones; every annotation describes the *visible* part of its object,
so masks, boxes and areas agree with the pixels. Thin bars are the case RetinaMask's best-matching
anchor assignment (Sec. 3.1) is meant for: an anchor of aspect 1:2 to 2:1 overlaps an 8:1 box with
IoU of at most about 1/3, below RetinaNet's foreground threshold of 0.5.

On-disk layout (``<root>`` is ``$DETECTRON2_DATASETS``, default ``datasets``, as in detectron2,
or the directory given to :func:`register_synthetic_shapes` / :func:`ensure_synthetic_dataset`)::

    <root>/synthetic_shapes/
        train/
            instances.json      # COCO instances format, polygons, bbox in XYWH_ABS
            images/000000.png ...
        val/
            instances.json
            images/000000.png ...

A split is written into a hidden temporary directory next to its destination and renamed into
place only once it is complete, so an interrupted generation never leaves a directory that looks
like a dataset; the next use regenerates it. The JSON's ``info`` block records the generation
parameters (and nothing time-dependent): the same parameters give byte-identical JSON and images.

Importing :mod:`retinamask_d2.data` registers ``synthetic_shapes_train`` and
``synthetic_shapes_val`` under the default root; the data is generated the first time
``DatasetCatalog.get`` is called for them, not on import.
"""

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.utils.logger import log_every_n_seconds

__all__ = [
    "SYNTHETIC_SHAPES_CLASSES",
    "SYNTHETIC_SHAPES_NUM_CLASSES",
    "SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES",
    "default_datasets_root",
    "synthetic_shapes_split_dir",
    "generate_synthetic_shapes",
    "is_synthetic_split_complete",
    "ensure_synthetic_dataset",
    "register_synthetic_shapes",
]

logger = logging.getLogger(__name__)

# Category ids in the JSON are 1-based positions in this tuple, as in COCO; detectron2 maps
# them to contiguous ids 0..K-1 in the same order.
SYNTHETIC_SHAPES_CLASSES = ("ellipse", "rectangle", "triangle", "star", "bar")
SYNTHETIC_SHAPES_NUM_CLASSES = len(SYNTHETIC_SHAPES_CLASSES)

SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES = {"train": 300, "val": 50}

_DATASET_DIRNAME = "synthetic_shapes"
_JSON_NAME = "instances.json"
_IMAGE_DIRNAME = "images"
# Bump when the generator changes what a seed produces, so existing copies are regenerated.
_GENERATOR_VERSION = 1

_MAX_OBJECTS_PER_IMAGE = 8
_PLACEMENT_ATTEMPTS = 10
# An occluded or truncated object must keep this fraction of its own area, and this many pixels,
# visible; placements that would hide more are rejected rather than leaving unrecognizable
# fragments as ground truth.
_MIN_VISIBLE_FRACTION = 0.35
_MIN_VISIBLE_PIXELS = 12
# Bars must stay long: a bar truncated to a third of its length is no longer the thin, elongated
# object the anchor-matching experiments need.
_MIN_VISIBLE_FRACTION_BAR = 0.6
# Long side over short side of a bar's visible region, at least the first value (see
# _visible_enough); the generator draws aspects up to the second.
_BAR_ASPECT_RANGE = (8.0, 20.0)


def default_datasets_root() -> str:
    """
    The datasets root detectron2 uses for its builtin datasets: ``$DETECTRON2_DATASETS``,
    or ``datasets`` relative to the working directory.
    """
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def synthetic_shapes_split_dir(split: str, root: Optional[str] = None) -> str:
    """
    Directory of one split: ``<root>/synthetic_shapes/<split>``.
    """
    return os.path.join(
        root if root is not None else default_datasets_root(), _DATASET_DIRNAME, split
    )


# ------------------------------------------------------------------------------------------------
# Shapes. Each returns polygon vertices (N, 2) in pixels, centered at the origin, unrotated.
# ``size`` is the square root of the intended area, so that sizes are comparable across classes.
# ------------------------------------------------------------------------------------------------


def _ellipse(rng: np.random.Generator, size: float) -> np.ndarray:
    ratio = rng.uniform(1.0, 2.2)
    b = size / np.sqrt(np.pi * ratio)
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    return np.stack([ratio * b * np.cos(t), b * np.sin(t)], axis=1)


def _rectangle(rng: np.random.Generator, size: float) -> np.ndarray:
    # Aspect at most 3, well apart from the bars, so that the classes stay separable by shape.
    ratio = rng.uniform(1.0, 3.0)
    w, h = size * np.sqrt(ratio), size / np.sqrt(ratio)
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2


def _triangle(rng: np.random.Generator, size: float) -> np.ndarray:
    # Circumradius of an equilateral triangle of area size**2 is size / 1.14; jittered corners
    # give varied triangles without slivers.
    radius = size / 1.14
    angles = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
    radii = radius * rng.uniform(0.85, 1.15, 3)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _star(rng: np.random.Generator, size: float) -> np.ndarray:
    points = int(rng.integers(5, 8))
    inner = rng.uniform(0.4, 0.6)
    outer_radius = size / np.sqrt(points * inner * np.sin(np.pi / points))
    angles = np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer_radius, inner * outer_radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _bar(rng: np.random.Generator, image_size: int) -> np.ndarray:
    # Length is drawn independently of the other classes' sizes: a bar is long and thin whatever
    # its area. The thickness floor of 2 px keeps it a solid band after rasterization.
    length = np.exp(rng.uniform(np.log(max(20.0, 0.2 * image_size)), np.log(0.9 * image_size)))
    thickness = max(2.0, length / rng.uniform(*_BAR_ASPECT_RANGE))
    return (
        np.array(
            [[-length, -thickness], [length, -thickness], [length, thickness], [-length, thickness]]
        )
        / 2
    )


def _sample_shape(rng: np.random.Generator, category: str, image_size: int) -> np.ndarray:
    """
    Vertices (N, 2) of one shape of ``category``, rotated and placed in an image of
    ``image_size`` pixels. Centers may lie near the border, so some objects are truncated.
    """
    if category == "bar":
        vertices = _bar(rng, image_size)
    else:
        # Log-uniform sizes spread the objects over small, medium and large relative to the image.
        size = np.exp(rng.uniform(np.log(0.07 * image_size), np.log(0.9 * image_size)))
        vertices = {
            "ellipse": _ellipse,
            "rectangle": _rectangle,
            "triangle": _triangle,
            "star": _star,
        }[category](rng, size)
    if category in ("bar", "rectangle") and rng.random() < 0.5:
        angle = float(rng.integers(0, 2)) * np.pi / 2  # axis-aligned, the easy case for anchors
    else:
        angle = rng.uniform(0, np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    center = rng.uniform(0, image_size, 2)
    return vertices @ rotation.T + center


def _polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _rasterize(vertices: np.ndarray, image_size: int) -> np.ndarray:
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    # 4 fractional bits keep sub-pixel vertex positions; no anti-aliasing, so the mask is exactly
    # the set of pixels that get the object's color.
    cv2.fillPoly(mask, [np.round(vertices * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


# ------------------------------------------------------------------------------------------------
# Masks to COCO polygons.
# ------------------------------------------------------------------------------------------------


def _mask_contours(mask: np.ndarray):
    # Contours of the 2x nearest-upsampled mask, mapped back, run a quarter pixel inside the
    # boundary of the original pixels. Rasterizing them (pycocotools, pixel centers) gives back
    # the mask exactly, including 1-2 px wide bars; contours through the pixel centers of the
    # mask itself would shave half a pixel off every side.
    upsampled = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, hierarchy = cv2.findContours(upsampled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return contours, hierarchy


def _has_holes(mask: np.ndarray) -> bool:
    _, hierarchy = _mask_contours(mask)
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """
    COCO polygons (one per connected component) of a mask without holes.
    """
    contours, hierarchy = _mask_contours(mask)
    polygons = []
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
        if parent >= 0:
            continue
        points = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2
        polygons.append([float(v) for v in points.ravel()])
    return polygons


# ------------------------------------------------------------------------------------------------
# Images.
# ------------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """
    A textured background (H, W, 3) float and its base color. Low-frequency blotches and
    optional stripes make color thresholding insufficient to find the objects.
    """
    base = rng.uniform(30, 225, 3)
    grid = int(rng.integers(3, 9))
    blotches = cv2.resize(
        rng.normal(0, 1, (grid, grid, 3)).astype(np.float32),
        (image_size, image_size),
        interpolation=cv2.INTER_CUBIC,
    )
    image = base + blotches * rng.uniform(8, 30)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, 16)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period)
        image = image + (np.sin(phase) * rng.uniform(5, 20))[..., None]
    return image, base


def _sample_color(rng: np.random.Generator, avoid: List[np.ndarray]) -> np.ndarray:
    """
    A color far enough from the background and from the objects it overlaps to be visible.
    """
    color = rng.uniform(0, 255, 3)
    for _ in range(20):
        if all(np.linalg.norm(color - other) >= 70 for other in avoid):
            break
        color = rng.uniform(0, 255, 3)
    return color


def _visible_enough(visible: np.ndarray, full_area: float, category: int) -> bool:
    area = int(visible.sum())
    if SYNTHETIC_SHAPES_CLASSES[category] != "bar":
        return area >= _MIN_VISIBLE_PIXELS and area >= _MIN_VISIBLE_FRACTION * full_area
    # A bar shortened by truncation or occlusion, or thickened by rasterization at an angle,
    # must still be as elongated as promised, measured on its annotation.
    return (
        area >= _MIN_VISIBLE_PIXELS
        and area >= _MIN_VISIBLE_FRACTION_BAR * full_area
        and _elongation(visible) >= _BAR_ASPECT_RANGE[0]
    )


def _elongation(mask: np.ndarray) -> float:
    """
    Long side over short side of the minimum-area rotated rectangle around the mask's polygons.
    """
    points = np.concatenate([np.reshape(p, (-1, 2)) for p in _mask_to_polygons(mask)])
    _, (w, h), _ = cv2.minAreaRect(points.astype(np.float32))
    return max(w, h) / max(min(w, h), 1e-6)


def _generate_image(rng: np.random.Generator, image_size: int):
    """
    One image (H, W, 3) uint8 BGR and its instances as (category index, visible mask), in
    drawing order.
    """
    background, base_color = _background(rng, image_size)
    # labels[y, x] = 1 + index of the topmost instance at that pixel, 0 for background.
    labels = np.zeros((image_size, image_size), dtype=np.int16)
    categories, full_areas, colors = [], [], []

    num_objects = int(rng.integers(2, _MAX_OBJECTS_PER_IMAGE + 1))
    for _ in range(num_objects):
        category = int(rng.integers(0, SYNTHETIC_SHAPES_NUM_CLASSES))
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            vertices = _sample_shape(rng, SYNTHETIC_SHAPES_CLASSES[category], image_size)
            mask = _rasterize(vertices, image_size)
            full_area = max(_polygon_area(vertices), float(mask.sum()))
            if not _visible_enough(mask, full_area, category):
                continue
            candidate = labels.copy()
            candidate[mask] = len(categories) + 1
            # Occlusion may shrink an earlier object but not hide most of it, and may not punch
            # a hole in it: COCO polygons cannot describe holes, so the mask would disagree
            # with the drawing.
            covered = np.unique(labels[mask])
            if all(
                _visible_enough(candidate == j, full_areas[j - 1], categories[j - 1])
                and not _has_holes(candidate == j)
                for j in covered[covered > 0]
            ):
                break
        else:
            continue
        labels = candidate
        overlapped = [colors[j - 1] for j in covered[covered > 0]]
        colors.append(_sample_color(rng, [base_color] + overlapped))
        categories.append(category)
        full_areas.append(full_area)

    image = background
    instances = []
    for index, (category, color) in enumerate(zip(categories, colors)):
        visible = labels == index + 1
        ys, xs = np.nonzero(visible)
        # A gentle gradient across each object, so that objects are not flat color patches.
        direction = rng.normal(0, 1, 2)
        direction /= np.linalg.norm(direction) + 1e-6
        ramp = ((xs - xs.mean()) * direction[0] + (ys - ys.mean()) * direction[1]) / image_size
        image[ys, xs] = color + ramp[:, None] * rng.uniform(0, 60)
        instances.append((category, visible))
    image = image + rng.normal(0, rng.uniform(2, 10), image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), instances


def _annotations(instances, image_id: int, first_annotation_id: int) -> List[Dict]:
    annotations = []
    for category, visible in instances:
        polygons = _mask_to_polygons(visible)
        ys, xs = np.nonzero(visible)
        x0, y0 = int(xs.min()), int(ys.min())
        annotations.append(
            {
                "id": first_annotation_id + len(annotations),
                "image_id": image_id,
                "category_id": category + 1,
                "segmentation": polygons,
                # The polygons rasterize to exactly these pixels, so the pixel count and the
                # pixel extent are the mask's area and box.
                "area": int(visible.sum()),
                "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                "iscrowd": 0,
            }
        )
    return annotations


# ------------------------------------------------------------------------------------------------
# Writing a split atomically.
# ------------------------------------------------------------------------------------------------


def _info(split: str, num_images: int, image_size: int, seed: int) -> Dict:
    return {
        "description": "synthetic_shapes, generated by retinamask_d2.data.synthetic",
        "generator_version": _GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
    }


def _temporary_prefix(split_dir: str) -> str:
    return "." + os.path.basename(split_dir) + ".incomplete."


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def _remove_abandoned_temporaries(split_dir: str) -> None:
    """
    Remove temporary directories left by generations on this host that were killed: their
    names carry the host and process id, and that process no longer exists.
    """
    if os.name != "posix":
        return  # os.kill(pid, 0) is not a harmless probe elsewhere
    parent = os.path.dirname(split_dir)
    pattern = re.compile(
        re.escape(_temporary_prefix(split_dir)) + r"(?P<host>[^.]+)\.(?P<pid>\d+)\."
    )
    for name in os.listdir(parent):
        match = pattern.match(name)
        if not match or match.group("host") != _host_tag():
            continue
        try:
            os.kill(int(match.group("pid")), 0)
        except ProcessLookupError:
            logger.info(
                f"Removing {os.path.join(parent, name)}, left by an interrupted generation."
            )
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def _read_info(split_dir: str) -> Optional[Dict]:
    json_file = os.path.join(split_dir, _JSON_NAME)
    if not os.path.isfile(json_file):
        return None
    try:
        with open(json_file) as f:
            info = json.load(f).get("info")
    except (ValueError, AttributeError):
        return None
    return info if isinstance(info, dict) else None


def is_synthetic_split_complete(
    split_dir: str, *, split: str, num_images: int, image_size: int = 128, seed: int = 0
) -> bool:
    """
    Whether ``split_dir`` holds a finished generation with exactly these parameters.
    """
    return _read_info(split_dir) == _info(split, num_images, image_size, seed)


def generate_synthetic_shapes(
    split_dir: str, *, split: str, num_images: int, image_size: int = 128, seed: int = 0
) -> str:
    """
    Generate one split into ``split_dir``, replacing a split generated there with other
    parameters (a complete one with the same parameters is identical and is kept). Image ``i``
    depends only on ``(seed, split, i)`` and the image size, so a split of a different length
    shares its first images.

    Args:
        split_dir: destination directory; its parent is created if needed, and the temporary
            directory is made there so that the final rename stays on one file system.
        split: split name; it is part of the seed, so "train" and "val" differ.
        num_images: number of images, at least 1.
        image_size: height and width of the square images, at least 64 (the bars' 8:1 aspect
            needs that much room).
        seed: non-negative integer.

    Returns:
        str: path of the COCO JSON file.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    if image_size < 64:
        raise ValueError(f"image_size must be at least 64, got {image_size}.")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    split_dir = os.path.abspath(split_dir)
    parent = os.path.dirname(split_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned_temporaries(split_dir)
    temporary = tempfile.mkdtemp(
        prefix=f"{_temporary_prefix(split_dir)}{_host_tag()}.{os.getpid()}.", dir=parent
    )
    # mkdtemp makes a private (0700) directory; the split is staged in a subdirectory with the
    # usual permissions, so that the renamed result is as readable as any other dataset.
    staging = os.path.join(temporary, split)
    try:
        os.mkdir(staging)
        _write_split(staging, split, num_images, image_size, seed)
        params = dict(split=split, num_images=num_images, image_size=image_size, seed=seed)
        if is_synthetic_split_complete(split_dir, **params):
            # Another process (e.g. another rank) finished the same split first; its copy is
            # identical and may already be in use, so keep it.
            return os.path.join(split_dir, _JSON_NAME)
        if os.path.isdir(split_dir):
            # A split generated with other parameters: directories appear here only by the
            # rename below, so nothing half-written or foreign is deleted.
            shutil.rmtree(split_dir)
        try:
            os.rename(staging, split_dir)
        except OSError:
            # Another process renamed its own copy into place first; a same-parameter copy is
            # identical, so keep it.
            if not is_synthetic_split_complete(split_dir, **params):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return os.path.join(split_dir, _JSON_NAME)


def _write_split(directory: str, split: str, num_images: int, image_size: int, seed: int) -> None:
    image_dir = os.path.join(directory, _IMAGE_DIRNAME)
    os.makedirs(image_dir)
    logger.info(
        f"Generating {num_images} synthetic_shapes images of split '{split}' (seed {seed}) ..."
    )
    start = time.perf_counter()
    split_stream = zlib.crc32(split.encode("utf-8"))
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_stream, index])
        image, instances = _generate_image(rng, image_size)
        file_name = f"{index:06d}.png"
        if not cv2.imwrite(os.path.join(image_dir, file_name), image):
            raise OSError(f"Could not write {os.path.join(image_dir, file_name)}.")
        image_id = index + 1
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        annotations.extend(_annotations(instances, image_id, len(annotations) + 1))
        log_every_n_seconds(
            logging.INFO, f"synthetic_shapes '{split}': {index + 1}/{num_images} images", 5
        )
    dataset = {
        "info": _info(split, num_images, image_size, seed),
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SYNTHETIC_SHAPES_CLASSES)
        ],
    }
    with open(os.path.join(directory, _JSON_NAME), "w") as f:
        json.dump(dataset, f, separators=(",", ":"))
    logger.info(
        f"Generated {num_images} images with {len(annotations)} instances of split '{split}' "
        f"in {time.perf_counter() - start:.1f}s."
    )


def ensure_synthetic_dataset(
    split: str,
    root: Optional[str] = None,
    *,
    num_images: Optional[int] = None,
    image_size: int = 128,
    seed: int = 0,
) -> Tuple[str, str]:
    """
    Generate a split unless a complete copy with the same parameters already exists.
    Call it before building a ``COCOEvaluator`` for a split that may not have been loaded yet:
    the evaluator reads the JSON file when it is constructed.

    Args:
        split: "train" or "val", or any other name if ``num_images`` is given.
        root: datasets root; ``$DETECTRON2_DATASETS`` (default ``datasets``) when None.
        num_images: defaults to :data:`SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES` for the split.

    Returns:
        (json_file, image_root)
    """
    if num_images is None:
        if split not in SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES:
            raise ValueError(
                f"synthetic_shapes has no default size for split {split!r}; "
                f"pass num_images, or use one of {sorted(SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES)}."
            )
        num_images = SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES[split]
    split_dir = synthetic_shapes_split_dir(split, root)
    json_file = os.path.join(split_dir, _JSON_NAME)
    params = dict(split=split, num_images=num_images, image_size=image_size, seed=seed)
    if not is_synthetic_split_complete(split_dir, **params):
        if os.path.isdir(split_dir):
            info = _read_info(split_dir)
            if info is None or not str(info.get("description", "")).startswith("synthetic_shapes"):
                # Never delete what this module did not write.
                raise FileExistsError(
                    f"{split_dir} exists but is not a synthetic_shapes split written by this "
                    f"module ({json_file} is missing or has no matching 'info'). Move or delete "
                    f"it, or choose another root, to generate the dataset there."
                )
            logger.info(f"{split_dir} was generated with {info}; regenerating with {params}.")
        generate_synthetic_shapes(split_dir, **params)
    return json_file, os.path.join(split_dir, _IMAGE_DIRNAME)


def register_synthetic_shapes(
    root: Optional[str] = None,
    *,
    num_images: Optional[Dict[str, int]] = None,
    image_size: int = 128,
    seed: int = 0,
) -> None:
    """
    Register ``synthetic_shapes_<split>`` for each split, the way
    :func:`detectron2.data.datasets.register_coco_instances` does, except that the split is
    generated when ``DatasetCatalog.get`` is first called. Registering again (e.g. with another
    root) replaces the earlier registration.

    Args:
        root: datasets root; ``$DETECTRON2_DATASETS`` (default ``datasets``) as set at the time
            of this call when None.
        num_images: images per split; defaults to :data:`SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES`.
        image_size, seed: see :func:`generate_synthetic_shapes`.
    """
    root = root if root is not None else default_datasets_root()
    num_images = dict(num_images if num_images is not None else SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES)
    for split, count in num_images.items():
        name = f"synthetic_shapes_{split}"
        split_dir = synthetic_shapes_split_dir(split, root)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            # Metadata refuses to overwrite a key with a different value, e.g. a new json_file.
            MetadataCatalog.remove(name)

        def load(name=name, split=split, count=count):
            json_file, image_root = ensure_synthetic_dataset(
                split, root, num_images=count, image_size=image_size, seed=seed
            )
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=os.path.join(split_dir, _JSON_NAME),
            image_root=os.path.join(split_dir, _IMAGE_DIRNAME),
            evaluator_type="coco",
            thing_classes=list(SYNTHETIC_SHAPES_CLASSES),
        )


register_synthetic_shapes()
