"""
"synthetic_shapes": a small instance-segmentation dataset drawn from a seed, on which RetinaMask
trains from scratch and is evaluated on a CPU in minutes. Each 128x128 image shows ellipses,
rectangles, triangles, stars and thin bars (8:1 to 20:1) of very different sizes on a textured,
noisy background; each annotation is the *visible* part of its object, as a COCO RLE mask. Thin
bars are the case of best-matching anchor assignment (Sec. 3.1): an anchor of aspect 1:2 to 2:1
overlaps an 8:1 box with IoU of at most about 1/3, below RetinaNet's foreground threshold of 0.5.

A split is ``<root>/synthetic_shapes/<split>/{instances.json,images/000000.png,...}``, with
``<root>`` = ``$DETECTRON2_DATASETS`` (default ``datasets``), generated once before training
(``python tools/prepare_synthetic.py`` or :func:`prepare_synthetic_datasets`).
"""

import functools
import json
import logging
import os
import shutil
import zlib

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures.masks import polygon_area
from pycocotools import mask as mask_util

from ..config import InputError

logger = logging.getLogger(__name__)

# Category ids in the JSON are 1-based positions in this tuple, as in COCO.
SYNTHETIC_SHAPES_CLASSES = ("ellipse", "rectangle", "triangle", "star", "bar")
SYNTHETIC_SHAPES_NUM_CLASSES = len(SYNTHETIC_SHAPES_CLASSES)
SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES = {"train": 300, "val": 50}
_PREFIX = "synthetic_shapes_"
# Aspect of a bar: drawn up to 20:1, and at least 8:1 as annotated, after truncation/occlusion.
_BAR_ASPECT_RANGE = (8.0, 20.0)


def _root(root=None):
    return root if root is not None else os.getenv("DETECTRON2_DATASETS", "datasets")


def _split_files(split, root):
    """``(json_file, image_root)`` of a split under ``root``."""
    directory = os.path.join(os.path.expanduser(root), "synthetic_shapes", split)
    return os.path.join(directory, "instances.json"), os.path.join(directory, "images")


def _sample_shape(rng, category, image_size):
    """
    Polygon (N, 2) in pixels of one shape of ``category``, rotated and placed anywhere in the
    image (so some objects are truncated). Sizes are log-uniform (small to large objects), and
    ``size`` is the square root of the intended area, comparable across classes.
    """
    if category == "bar":
        # A bar's length is drawn on its own: long and thin whatever its area; >= 2 px thick
        # keeps it a solid band after rasterization.
        low, high = np.log(max(20.0, 0.2 * image_size)), np.log(0.9 * image_size)
        length = np.exp(rng.uniform(low, high))
        thickness = max(2.0, length / rng.uniform(*_BAR_ASPECT_RANGE))
        vertices = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [length / 2, thickness / 2]
    else:
        size = np.exp(rng.uniform(np.log(0.07 * image_size), np.log(0.9 * image_size)))
        if category == "ellipse":
            ratio = rng.uniform(1.0, 2.2)
            b = size / np.sqrt(np.pi * ratio)
            t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
            vertices = np.stack([ratio * b * np.cos(t), b * np.sin(t)], axis=1)
        elif category == "rectangle":
            # Aspect at most 3, well apart from the bars, so that the classes stay separable.
            ratio = rng.uniform(1.0, 3.0)
            w, h = size * np.sqrt(ratio), size / np.sqrt(ratio)
            vertices = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
        else:
            if category == "triangle":
                # Jittered corners of an equilateral triangle of area size**2: no slivers.
                angles = np.array([0.0, 2, 4]) * np.pi / 3 + rng.uniform(-0.35, 0.35, 3)
                radii = size / 1.14 * rng.uniform(0.85, 1.15, 3)
            else:  # star
                points = int(rng.integers(5, 8))
                inner = rng.uniform(0.4, 0.6)
                outer = size / np.sqrt(points * inner * np.sin(np.pi / points))
                angles = np.arange(2 * points) * np.pi / points
                radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner * outer)
            vertices = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if category in ("bar", "rectangle") and rng.random() < 0.5:
        angle = float(rng.integers(0, 2)) * np.pi / 2  # axis-aligned, the easy case for anchors
    else:
        angle = rng.uniform(0, np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return vertices @ rotation.T + rng.uniform(0, image_size, 2)


def _rasterize(vertices, image_size):
    """Boolean (H, W) mask; 4 fractional bits and no anti-aliasing: exactly the drawn pixels."""
    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(vertices * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _elongation(mask):
    """Long over short side of the min-area rotated rectangle around the mask's pixels."""
    ys, xs = np.nonzero(mask)
    # Each pixel as the square of half its size at its center, so that a 1-pixel-wide line is
    # 0.5 (not 0) wide.
    corners = [(xs + 0.5 + dx, ys + 0.5 + dy) for dx in (-0.25, 0.25) for dy in (-0.25, 0.25)]
    points = np.concatenate([np.stack(c, axis=1) for c in corners]).astype(np.float32)
    _, (w, h), _ = cv2.minAreaRect(points)
    return max(w, h) / max(min(w, h), 1e-6)


def _visible_enough(visible, full_area, category):
    # An occluded or truncated object keeps 35% of its area (bars 60%, to stay long) and 12
    # pixels visible, at least: unrecognizable fragments make poor ground truth.
    area = int(visible.sum())
    if area < 12 or area < (0.6 if category == "bar" else 0.35) * full_area:
        return False
    return category != "bar" or _elongation(visible) >= _BAR_ASPECT_RANGE[0]


def _has_holes(mask):
    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def _generate_image(rng, image_size):
    """One image (H, W, 3) uint8 BGR and its instances as [(category index, visible mask)]."""
    # Background: a base color with low-frequency blotches and optional stripes, so that a color
    # threshold does not find the objects.
    base_color = rng.uniform(30, 225, 3)
    grid = int(rng.integers(3, 9))
    blotches = rng.normal(0, 1, (grid, grid, 3)).astype(np.float32)
    blotches = cv2.resize(blotches, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
    image = base_color + blotches * rng.uniform(8, 30)
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
        theta, period = rng.uniform(0, np.pi), rng.uniform(4, 16)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) * (2 * np.pi / period)
        image = image + (np.sin(phase) * rng.uniform(5, 20))[..., None]

    labels = np.zeros((image_size, image_size), dtype=np.int16)  # 1 + topmost instance, 0 = bg
    categories, full_areas, colors = [], [], []
    for _ in range(int(rng.integers(2, 9))):
        category = SYNTHETIC_SHAPES_CLASSES[int(rng.integers(0, SYNTHETIC_SHAPES_NUM_CLASSES))]
        for _attempt in range(10):
            vertices = _sample_shape(rng, category, image_size)
            mask = _rasterize(vertices, image_size)
            full_area = max(polygon_area(vertices[:, 0], vertices[:, 1]), float(mask.sum()))
            if not _visible_enough(mask, full_area, category):
                continue
            candidate = labels.copy()
            candidate[mask] = len(categories) + 1
            # The new shape may shrink earlier ones but not hide most of them. Nor may it punch
            # a hole in one: images of existing seeds were drawn under this rule.
            covered = [j for j in np.unique(labels[mask]) if j > 0]
            if all(
                _visible_enough(candidate == j, full_areas[j - 1], categories[j - 1])
                and not _has_holes(candidate == j)
                for j in covered
            ):
                break
        else:
            continue
        labels = candidate
        # A color far enough (70) from the background and the objects it overlaps to be seen.
        avoid = [base_color] + [colors[j - 1] for j in covered]
        for _ in range(21):
            color = rng.uniform(0, 255, 3)
            if all(np.linalg.norm(color - other) >= 70 for other in avoid):
                break
        colors.append(color)
        categories.append(category)
        full_areas.append(full_area)

    instances = []
    for index, (category, color) in enumerate(zip(categories, colors)):
        visible = labels == index + 1
        ys, xs = np.nonzero(visible)
        # A gentle gradient across each object, so that objects are not flat color patches.
        direction = rng.normal(0, 1, 2)
        direction /= np.linalg.norm(direction) + 1e-6
        ramp = ((xs - xs.mean()) * direction[0] + (ys - ys.mean()) * direction[1]) / image_size
        image[ys, xs] = color + ramp[:, None] * rng.uniform(0, 60)
        instances.append((SYNTHETIC_SHAPES_CLASSES.index(category), visible))
    image = image + rng.normal(0, rng.uniform(2, 10), image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), instances


def generate_synthetic_shapes(directory, split, num_images, image_size=128, seed=0):
    """
    Write a split: ``directory/instances.json`` (COCO instances, RLE masks) and
    ``directory/images/*.png``. Image ``i`` depends only on ``(seed, split, i, image_size)``, and
    the same arguments give byte-identical files. The split is written to
    ``<directory>.incomplete`` and renamed into place when complete, so an interrupted run never
    leaves a directory that looks finished; ``directory`` must not exist yet. Returns the path
    of the JSON file.
    """
    if num_images < 1 or image_size < 64 or seed < 0:
        raise InputError(
            f"synthetic_shapes needs num_images >= 1, image_size >= 64 (room for 8:1 bars) and "
            f"seed >= 0; got {num_images}, {image_size}, {seed}. Pass values in these ranges."
        )
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise InputError(f"{directory} exists already. Delete it to generate the split again.")
    staging = directory + ".incomplete"  # one process generates: a fixed name, reused after a kill
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "images"))
    logger.info(f"Generating {num_images} synthetic_shapes '{split}' images in {directory} ...")
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])
        image, instances = _generate_image(rng, image_size)
        file_name = f"{index:06d}.png"
        if not cv2.imwrite(path := os.path.join(staging, "images", file_name), image):
            raise OSError(f"Could not write {path}.")
        images.append(dict(id=index + 1, file_name=file_name, width=image_size, height=image_size))
        for category, visible in instances:
            rle = mask_util.encode(np.asfortranarray(visible, dtype=np.uint8))
            box = [int(v) for v in mask_util.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
            annotations.append(
                dict(
                    id=len(annotations) + 1, image_id=index + 1, category_id=category + 1,
                    segmentation=rle, area=int(mask_util.area(rle)), bbox=box, iscrowd=0,
                )
            )  # fmt: skip
    # Nothing time-dependent in "info": the same parameters give the same bytes.
    info = dict(split=split, num_images=num_images, image_size=image_size, seed=seed)
    categories = [dict(id=i + 1, name=n) for i, n in enumerate(SYNTHETIC_SHAPES_CLASSES)]
    with open(os.path.join(staging, "instances.json"), "w") as f:
        json.dump(dict(info=info, images=images, annotations=annotations, categories=categories), f)
    os.replace(staging, directory)
    logger.info(f"Generated {len(annotations)} instances of synthetic_shapes '{split}'.")
    return os.path.join(directory, "instances.json")


def ensure_synthetic_dataset(split, root=None, *, num_images=None, image_size=128, seed=0):
    """
    Generate ``<root>/synthetic_shapes/<split>`` (``root``: default ``$DETECTRON2_DATASETS`` or
    ``datasets``) unless its JSON file exists, with ``num_images`` (default
    :data:`SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES` ``[split]``). Returns ``(json_file, image_root)``.
    """
    json_file, image_root = _split_files(split, _root(root))
    if not os.path.isfile(json_file):
        if num_images is None and split not in SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES:
            raise InputError(
                f"synthetic_shapes has no split {split!r}. Use one of "
                f"{', '.join(_PREFIX + s for s in SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES)}."
            )
        num_images = num_images or SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES[split]
        generate_synthetic_shapes(os.path.dirname(json_file), split, num_images, image_size, seed)
    return json_file, image_root


def prepare_synthetic_datasets(dataset_names, root=None):
    """
    Generate every missing default split among ``dataset_names`` (e.g. ``cfg.DATASETS.TRAIN +
    cfg.DATASETS.TEST``) named ``synthetic_shapes_<split>``; other names are ignored. Call it in
    the launching process, before workers or ranks start: they only read the files.
    """
    for name in dataset_names:
        if name.startswith(_PREFIX):
            ensure_synthetic_dataset(name[len(_PREFIX) :], root)


def _load(split, root):
    json_file, image_root = _split_files(split, root)
    if not os.path.isfile(json_file):
        raise InputError(
            f"Dataset {_PREFIX + split!r} has no file {json_file}. Generate it first: "
            f"`python tools/prepare_synthetic.py --root {root}`."
        )
    return load_coco_json(json_file, image_root, _PREFIX + split)


def register_synthetic_shapes(root=None):
    """
    Register ``synthetic_shapes_train`` and ``synthetic_shapes_val`` under ``root`` (default
    ``$DETECTRON2_DATASETS`` at call time, or ``datasets``), replacing an earlier registration.
    Nothing is generated; loading a split whose files are missing raises :class:`InputError`.
    """
    root = _root(root)
    for split in SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES:
        name, (json_file, image_root) = _PREFIX + split, _split_files(split, root)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)  # it refuses to change json_file in place
        # register_coco_instances, with a loader that says how to fix a missing file.
        DatasetCatalog.register(name, functools.partial(_load, split, root))
        MetadataCatalog.get(name).set(
            json_file=json_file, image_root=image_root, evaluator_type="coco",
            thing_classes=list(SYNTHETIC_SHAPES_CLASSES),
        )  # fmt: skip


register_synthetic_shapes()
