"""
python -m retinamask_d2.demo draws the detections of a checkpoint on images.
"""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, REPO_ROOT, load_config
from retinamask_d2 import demo
from retinamask_d2.data import ensure_synthetic_dataset

CONFIG_NAME = os.path.join("synthetic", "retinamask_synthetic.yaml")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with two synthetic_shapes images."""
    _, image_root = ensure_synthetic_dataset(
        "val", str(tmp_path_factory.mktemp("datasets")), num_images=2
    )
    return image_root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """
    A checkpoint of the untrained model. Every prior-initialized score is about 0.01, so with a
    threshold of 0 it returns 100 detections per image, the top 50 with masks.
    """
    directory = str(tmp_path_factory.mktemp("weights"))
    DetectionCheckpointer(build_model(load_config(CONFIG_NAME)), directory).save("model")
    return os.path.join(directory, "model.pth")


def test_demo_draws_instances_on_every_image(images, weights, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable, "-m", "retinamask_d2.demo",
            "--config-file", os.path.join(CONFIG_DIR, CONFIG_NAME),
            "--input", images,
            "--output", str(out),
            "--confidence-threshold", "0",
            "--scale", "2",
            "MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu",
        ],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]

    names = sorted(os.listdir(images))
    assert sorted(os.listdir(out)) == names
    for name in names:
        # All 100 detections are drawn; the 50 below the top 50 have no mask to overlay.
        assert f"{name}: 100 instances" in result.stderr + result.stdout
        drawn = cv2.imread(str(out / name))
        assert drawn is not None and drawn.shape == (256, 256, 3)
        original = cv2.resize(cv2.imread(os.path.join(images, name)), (256, 256))
        # Boxes, labels and mask overlays change a large part of the picture.
        changed = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2) > 30
        assert changed.mean() > 0.05, changed.mean()


def test_missing_weights_are_a_clear_error(images, tmp_path):
    argv = [
        "--config-file", os.path.join(CONFIG_DIR, CONFIG_NAME),
        "--input", images,
        "--output", str(tmp_path),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="sets no MODEL.WEIGHTS"):
        demo.main(argv)
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        demo.main(argv + ["MODEL.WEIGHTS", str(tmp_path / "no_such.pth")])


def test_bad_input_paths_are_named(weights, tmp_path):
    def run(input_path, config=os.path.join(CONFIG_DIR, CONFIG_NAME)):
        demo.main(
            ["--config-file", config, "--input", str(input_path), "--output", str(tmp_path)]
            + ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu"]
        )

    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        run(tmp_path, config=str(tmp_path / "no_such.yaml"))
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        run(tmp_path / "no_such.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No images in folder"):
        run(empty)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        run(broken)
