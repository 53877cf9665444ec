import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from pycocotools import mask as mask_utils

from retinamask_d2.config import InputError
from retinamask_d2.data import (
    SYNTHETIC_SHAPES_CLASSES,
    SYNTHETIC_SHAPES_NUM_CLASSES,
    ensure_synthetic_dataset,
    generate_synthetic_shapes,
    load_checked_dataset,
    prepare_synthetic_datasets,
    register_synthetic_shapes,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _generate(directory, num_images=6, seed=0, split="val"):
    return generate_synthetic_shapes(str(directory), split, num_images, 128, seed)


def _files(split_dir):
    names = sorted(os.listdir(os.path.join(split_dir, "images")))
    return {name: open(os.path.join(split_dir, "images", name), "rb").read() for name in names}


def _subprocess_env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 24-image split, its directory and parsed JSON, shared by the read-only tests."""
    split_dir = str(tmp_path_factory.mktemp("shared") / "val")
    json_file = _generate(split_dir, num_images=24)
    with open(json_file) as f:
        return split_dir, json.load(f)


@pytest.fixture
def restore_default_registration():
    yield
    register_synthetic_shapes()


def test_same_seed_gives_identical_files(tmp_path):
    first = _generate(tmp_path / "a" / "val")
    second = _generate(tmp_path / "b" / "val")
    assert open(first, "rb").read() == open(second, "rb").read()
    assert _files(tmp_path / "a" / "val") == _files(tmp_path / "b" / "val")


def test_different_seed_or_split_differs(tmp_path):
    base = open(_generate(tmp_path / "a" / "val"), "rb").read()
    assert open(_generate(tmp_path / "b" / "val", seed=1), "rb").read() != base
    other_split = json.load(open(_generate(tmp_path / "c" / "val", split="train")))
    assert other_split["annotations"] != json.loads(base)["annotations"]


def test_existing_directory_is_not_overwritten(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(InputError, match="exists already. Delete it"):
        _generate(tmp_path / "val")


def test_coco_fields(dataset):
    split_dir, data = dataset
    assert [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])] == list(
        SYNTHETIC_SHAPES_CLASSES
    )
    assert len(data["images"]) == 24
    for image in data["images"]:
        decoded = cv2.imread(os.path.join(split_dir, "images", image["file_name"]))
        assert decoded.shape == (image["height"], image["width"], 3)
    ids = [a["id"] for a in data["annotations"]]
    assert len(set(ids)) == len(ids)
    assert all(a["iscrowd"] == 0 for a in data["annotations"])
    assert {a["category_id"] for a in data["annotations"]} == set(
        range(1, SYNTHETIC_SHAPES_NUM_CLASSES + 1)
    )
    assert "time" not in json.dumps(data.get("info", {})).lower()


def test_rle_masks_boxes_and_areas_agree(dataset):
    _, data = dataset
    sizes = {image["id"]: (image["height"], image["width"]) for image in data["images"]}
    visible = {image_id: np.zeros(size, dtype=int) for image_id, size in sizes.items()}
    for annotation in data["annotations"]:
        rle = annotation["segmentation"]
        assert rle["size"] == list(sizes[annotation["image_id"]])
        mask = mask_utils.decode(rle)
        ys, xs = np.nonzero(mask)
        assert annotation["area"] == len(xs)
        x0, y0 = xs.min(), ys.min()
        assert annotation["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
        visible[annotation["image_id"]] += mask
    # Visible regions of different objects do not overlap: occluded parts were cut away.
    assert all(v.max() <= 1 for v in visible.values())


def test_annotations_match_drawn_pixels(dataset):
    # Each object is one color (plus a gentle ramp and noise), distinct from the objects it
    # touches: pixels inside a mask are close to the mask's median color, just outside mostly not.
    split_dir, data = dataset
    image = data["images"][0]
    pixels = cv2.imread(os.path.join(split_dir, "images", image["file_name"])).astype(float)
    checked = 0
    for annotation in data["annotations"]:
        if annotation["image_id"] != image["id"] or annotation["area"] < 100:
            continue
        mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
        color = np.median(pixels[mask], axis=0)
        inside = np.linalg.norm(pixels[mask] - color, axis=1)
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~mask
        outside = np.linalg.norm(pixels[ring] - color, axis=1)
        assert np.median(inside) < 30 < np.median(outside)
        checked += 1
    assert checked >= 2


def test_thin_bars_are_present(dataset):
    _, data = dataset
    bar_id = SYNTHETIC_SHAPES_CLASSES.index("bar") + 1
    bars = [a for a in data["annotations"] if a["category_id"] == bar_id]
    assert len(bars) >= 10
    rotated_aspects, box_aspects = [], []
    for bar in bars:
        ys, xs = np.nonzero(mask_utils.decode(bar["segmentation"]))
        # The rotated rectangle around the pixel centers, each widened by half a pixel.
        (_, _), (w, h), _ = cv2.minAreaRect(np.stack([xs, ys], axis=1).astype(np.float32))
        rotated_aspects.append((max(w, h) + 0.5) / (min(w, h) + 0.5))
        _, _, bw, bh = bar["bbox"]
        box_aspects.append(max(bw, bh) / min(bw, bh))
    # Even after occlusion and truncation every bar stays at least 8:1; the axis-aligned ones
    # have such boxes too, which is where RetinaNet's IoU matching leaves them without anchors.
    assert min(rotated_aspects) >= 8
    assert max(box_aspects) >= 8
    assert min(box_aspects) < 8  # some are at an angle


def test_interrupted_generation_is_not_used_and_rerun_completes(
    tmp_path, restore_default_registration
):
    root = str(tmp_path)
    script = textwrap.dedent(f"""
        from retinamask_d2.data import ensure_synthetic_dataset
        ensure_synthetic_dataset("val", {root!r}, num_images=100000)
        """)
    process = subprocess.Popen([sys.executable, "-c", script], env=_subprocess_env(), cwd=REPO_ROOT)
    try:
        pattern = os.path.join(root, "synthetic_shapes", "val.incomplete", "images", "*.png")
        deadline = time.time() + 120
        while len(glob.glob(pattern)) < 3:
            assert process.poll() is None, "generation ended before it could be interrupted"
            assert time.time() < deadline, "generation did not start"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert os.listdir(os.path.join(root, "synthetic_shapes")) == ["val.incomplete"]
    register_synthetic_shapes(root)
    with pytest.raises(InputError):
        DatasetCatalog.get("synthetic_shapes_val")

    json_file, image_root = ensure_synthetic_dataset("val", root, num_images=5)
    assert len(json.load(open(json_file))["images"]) == 5 == len(os.listdir(image_root))
    assert os.listdir(os.path.join(root, "synthetic_shapes")) == ["val"]


def test_missing_split_says_how_to_generate_it(tmp_path, restore_default_registration):
    register_synthetic_shapes(str(tmp_path))
    with pytest.raises(InputError, match=r"synthetic_shapes_train.*prepare_synthetic.py --root "):
        DatasetCatalog.get("synthetic_shapes_train")


def test_import_registers_without_generating(tmp_path):
    script = textwrap.dedent("""
        import retinamask_d2.data
        from detectron2.data import DatasetCatalog, MetadataCatalog
        assert "synthetic_shapes_train" in DatasetCatalog.list()
        print(MetadataCatalog.get("synthetic_shapes_val").json_file)
        """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_subprocess_env(DETECTRON2_DATASETS=str(tmp_path)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == os.path.join(
        str(tmp_path), "synthetic_shapes", "val", "instances.json"
    )
    assert os.listdir(tmp_path) == []


def test_prepare_generates_only_synthetic_splits(tmp_path):
    prepare_synthetic_datasets(["coco_2017_val", "synthetic_shapes_val"], str(tmp_path))
    assert os.listdir(tmp_path / "synthetic_shapes") == ["val"]
    assert len(os.listdir(tmp_path / "synthetic_shapes" / "val" / "images")) == 50
    with pytest.raises(InputError, match="no split 'test'"):
        prepare_synthetic_datasets(["synthetic_shapes_test"], str(tmp_path))


def test_registered_split_loads_from_given_root(tmp_path, restore_default_registration):
    ensure_synthetic_dataset("val", str(tmp_path), num_images=3)
    register_synthetic_shapes(str(tmp_path))
    register_synthetic_shapes(str(tmp_path))  # again: no error

    dicts = DatasetCatalog.get("synthetic_shapes_val")
    assert len(dicts) == 3
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert all(
        0 <= a["category_id"] < SYNTHETIC_SHAPES_NUM_CLASSES
        for d in dicts
        for a in d["annotations"]
    )

    metadata = MetadataCatalog.get("synthetic_shapes_val")
    assert metadata.evaluator_type == "coco"
    assert metadata.thing_classes == list(SYNTHETIC_SHAPES_CLASSES)
    assert metadata.json_file.startswith(str(tmp_path))
    COCOEvaluator("synthetic_shapes_val", output_dir=None)  # reads metadata.json_file

    assert len(load_checked_dataset("synthetic_shapes_val", SYNTHETIC_SHAPES_NUM_CLASSES)) == 3


def test_prepare_command_generates_both_splits(tmp_path):
    command = [sys.executable, "tools/prepare_synthetic.py", "--root", str(tmp_path)]
    result = subprocess.run(
        command, env=_subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for split, num_images in (("train", 300), ("val", 50)):
        json_file = tmp_path / "synthetic_shapes" / split / "instances.json"
        assert f"synthetic_shapes_{split}: {json_file}" in result.stdout
        assert len(json.loads(json_file.read_text())["images"]) == num_images
