import importlib.util
import os

import numpy as np
import pycocotools.mask as mask_util
import torch

from conftest import REPO_ROOT
from retinamask_d2.conventions import reference_coco_boxes

_spec = importlib.util.spec_from_file_location(
    "compare_original", os.path.join(REPO_ROOT, "tools", "compare_original.py")
)
compare_original = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_original)
compare, summarize = compare_original.compare, compare_original.summarize


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(rle, counts=rle["counts"].decode())


def _square(top, left, h, w, size=(40, 40)):
    mask = np.zeros(size, dtype=bool)
    mask[top : top + h, left : left + w] = True
    return mask


# One reference detection of class 3 (1-based): inclusive box (10, 20, 29, 39), so ours is
# (10, 20, 30, 40) with 0-based class 2.
REF = {"boxes": [[10.0, 20.0, 29.0, 39.0]], "scores": [0.7], "labels": [3]}
OURS = np.array([[10.0, 20.0, 30.0, 40.0]])


def test_same_detection_in_both_conventions_is_paired_and_meets_targets():
    rows = compare(REF, OURS + [0.004, 0, 0, -0.004], np.array([0.70005]), np.array([2]))
    assert abs(rows[0]["box_diff"] - 0.004) < 1e-9
    assert abs(rows[0]["score_diff"] - 5e-5) < 1e-9
    s = summarize(rows)
    assert (s["paired"], s["boxes_off"], s["meets_targets"]) == (1, 0, True)


def test_in_a_downscaled_input_their_x2_plus_one_input_pixel_is_ours():
    # The network saw the image at twice its size: one input pixel is half an image pixel.
    ours = np.array([[10.0, 20.0, 29.5, 39.5]])
    rows = compare(REF, ours, np.array([0.7]), np.array([2]), pixel=(0.5, 0.5))
    assert rows[0]["box_diff"] == 0.0
    # Their COCO box adds its +1 after scaling to the image: (10, 20, 20, 20), ours (10, 20,
    # 19.5, 19.5).
    assert rows[0]["coco_box_diff"] == 0.5
    assert summarize(rows)["meets_targets"] is True
    # The evaluator's reference COCO boxes (COCO_BOXES "reference") are theirs.
    coco = reference_coco_boxes(torch.as_tensor(ours), (100, 100), (200, 200)).numpy()
    rows = compare(REF, ours, np.array([0.7]), np.array([2]), pixel=(0.5, 0.5), coco_boxes=coco)
    assert rows[0]["coco_box_diff"] == 0.0


def test_other_class_is_not_paired():
    rows = compare(REF, OURS, np.array([0.7]), np.array([3]))
    assert rows == [None]
    assert summarize(rows)["meets_targets"] is False


def test_box_off_by_two_hundredths_of_a_pixel_misses_the_targets():
    rows = compare(REF, OURS + [0, 0, 0.02, 0], np.array([0.7]), np.array([2]))
    s = summarize(rows)
    assert s["paired"] == 1 and s["boxes_off"] == 1
    assert abs(s["max_box_diff"] - 0.02) < 1e-9
    assert s["meets_targets"] is False


def test_score_off_by_more_than_the_tolerance_misses_the_targets():
    rows = compare(REF, OURS, np.array([0.7002]), np.array([2]))
    assert summarize(rows)["meets_targets"] is False


def test_higher_reference_score_takes_the_shared_partner():
    ref = {"boxes": [[10, 20, 29, 39], [11, 20, 30, 39]], "scores": [0.3, 0.6], "labels": [3, 3]}
    rows = compare(ref, OURS, np.array([0.6]), np.array([2]))
    assert rows[0] is None and rows[1] is not None
    s = summarize(rows)
    assert (s["reference"], s["paired"]) == (2, 1)


def test_mask_iou():
    a, b = _square(0, 0, 10, 10), _square(0, 0, 10, 9)
    assert compare_original.mask_iou(a, b) == 0.9
    assert compare_original.mask_iou(a, _square(20, 20, 10, 10)) == 0.0
    empty = np.zeros((40, 40), dtype=bool)
    assert compare_original.mask_iou(empty, empty) == 1.0  # a box too small to hold a mask

    ref = dict(REF, masks=[_rle(a)])
    rows = compare(ref, OURS, np.array([0.7]), np.array([2]), masks=b[None])
    assert rows[0]["mask_iou"] == 0.9
    s = summarize(rows)
    assert (s["masks_ok"], s["meets_targets"]) == (0, False)
    rows = compare(ref, OURS, np.array([0.7]), np.array([2]), masks=a[None])
    assert summarize(rows)["meets_targets"] is True
