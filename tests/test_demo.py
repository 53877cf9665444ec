"""
demo/demo.py draws the detections of a checkpoint on images.
"""

import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from conftest import CONFIG_DIR, REPO_ROOT, load_config
from retinamask_d2.visualization import remove_overlaps

CONFIG_NAME = os.path.join("synthetic", "retinamask_synthetic.yaml")


def _write_image(path, size=(128, 128), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(100, 160, (*size, 3), dtype=np.uint8)
    cv2.ellipse(image, (size[1] // 3, size[0] // 2), (size[1] // 8, size[0] // 5), 0, 0, 360,
                (40, 200, 90), -1)  # fmt: skip
    cv2.imwrite(str(path), image)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with two images."""
    root = tmp_path_factory.mktemp("images")
    for i in range(2):
        _write_image(root / f"{i:06d}.png", seed=i)
    return str(root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """
    A checkpoint of the untrained model. Every prior-initialized score is about 0.01, so with a
    threshold of 0 it returns 100 detections per image, the top 50 with masks.
    """
    directory = str(tmp_path_factory.mktemp("weights"))
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(load_config(CONFIG_NAME)), directory).save("model")
    return os.path.join(directory, "model.pth")


# Runs the script named by its first argument as __main__, then prints the peak resident memory
# of its own process (KiB on Linux), whatever else the test process has run.
_PEAK_MEMORY_REPORTER = """
import atexit, resource, runpy, sys
atexit.register(lambda: print("peak RSS KiB:", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _demo(*args, weights=None, report_peak_memory=False):
    reporter = ["-c", _PEAK_MEMORY_REPORTER] if report_peak_memory else []
    cmd = [sys.executable, *reporter, os.path.join("demo", "demo.py"),
           "--config-file", os.path.join(CONFIG_DIR, CONFIG_NAME), *map(str, args),
           "MODEL.DEVICE", "cpu", *(["MODEL.WEIGHTS", weights] if weights else [])]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Messages go to stdout (detectron2's logger), errors to stderr: both end up in .stdout.
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300,
    )  # fmt: skip


def test_demo_draws_instances_on_every_image(images, weights, tmp_path):
    out = tmp_path / "out"
    result = _demo("--input", images, "--output", out, "--confidence-threshold", "0",
                   "--overlap-threshold", "1", "--scale", "2", weights=weights)  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:]

    names = sorted(os.listdir(images))
    assert sorted(os.listdir(out)) == names
    for name in names:
        # Threshold 0: all 100 detections (TEST.DETECTIONS_PER_IMAGE), the top 50 with masks.
        assert f"{name}: 100 instances" in result.stdout
        drawn = cv2.imread(str(out / name))
        assert drawn is not None and drawn.shape == (256, 256, 3)
        original = cv2.resize(cv2.imread(os.path.join(images, name)), (256, 256))
        # Boxes, labels and mask overlays change a large part of the picture.
        changed = np.abs(drawn.astype(int) - original.astype(int)).max(axis=2) > 30
        assert changed.mean() > 0.05, changed.mean()


def test_unreadable_files_are_named_and_skipped(weights, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _write_image(folder / "good.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("a text file")
    result = _demo("--input", folder, "--output", tmp_path / "out", weights=weights)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "Skipped" in result.stdout and "broken.png" in result.stdout
    assert "notes.txt" in result.stdout
    assert os.listdir(tmp_path / "out") == ["good.png"]

    os.remove(folder / "good.png")
    result = _demo("--input", folder, "--output", tmp_path / "out2", weights=weights)
    assert result.returncode != 0
    assert "None of the 2 input file(s) is a readable image" in result.stdout


def test_huge_image_is_drawn_within_bounded_memory(weights, tmp_path):
    path = _write_image(tmp_path / "huge.png", size=(3000, 4000))
    result = _demo("--input", path, "--output", tmp_path / "out", "--scale", "3",
                   "--confidence-threshold", "0", weights=weights,
                   report_peak_memory=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:]
    drawn = cv2.imread(str(tmp_path / "out" / "huge.png"))
    assert max(drawn.shape[:2]) <= 2000
    # The demo's own peak: torch itself takes several hundred MB; drawing a 12000x9000 canvas
    # with full-size masks took over 10 GB.
    (peak_kib,) = re.findall(r"^peak RSS KiB: (\d+)$", result.stdout, re.MULTILINE)
    assert int(peak_kib) / 2**20 < 3, peak_kib


def test_bad_weights_and_paths_are_one_line_errors(images, weights, tmp_path):
    result = _demo("--input", images, "--output", tmp_path)
    assert result.returncode != 0 and "sets no MODEL.WEIGHTS" in result.stdout
    assert "Traceback" not in result.stdout
    result = _demo("--input", tmp_path / "no_such.png", "--output", tmp_path, weights=weights)
    assert "neither an image file nor a folder" in result.stdout
    assert "Traceback" not in result.stdout
    text = tmp_path / "weights.txt"
    text.write_text("not a checkpoint\n")
    result = _demo("--input", images, "--output", tmp_path, weights=str(text))
    assert result.returncode != 0 and "weights.txt" in result.stdout
    assert "Traceback" not in result.stdout


def test_remove_overlaps_keeps_the_best_of_each_object():
    instances = Instances((100, 100))
    instances.pred_boxes = Boxes(
        torch.tensor([[10, 10, 50, 50], [11, 11, 50, 52], [60, 60, 90, 90.0]])
    )
    instances.scores = torch.tensor([0.6, 0.9, 0.3])
    instances.pred_classes = torch.tensor([0, 3, 0])  # one object seen as two classes
    kept = remove_overlaps(instances, 0.5)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.3])
    assert kept.pred_classes.tolist() == [3, 0]
    assert len(remove_overlaps(instances, 1.0)) == 3
