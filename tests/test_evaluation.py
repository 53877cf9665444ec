"""
The paper's evaluation protocol: box AP over every detection, mask AP over the top ones. On a
trained model end to end, see test_train_net.py.
"""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from conftest import load_config
from retinamask_d2 import TopDetectionsCOCOEvaluator, build_coco_evaluator

H = W = 64


def _mask(box):
    m = np.zeros((H, W), dtype=bool)
    if box is not None:
        x0, y0, x1, y1 = box
        m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def two_images(tmp_path):
    """A registered COCO dataset of two images, one category; image 2 also has a crowd region."""
    annotations = []
    for image_id, box, crowd in [(1, (5, 5, 30, 30), 0), (2, (10, 10, 40, 40), 0),
                                 (2, (40, 40, 60, 60), 1)]:  # fmt: skip
        rle = mask_util.encode(np.asfortranarray(_mask(box).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        x0, y0, x1, y1 = box
        annotations.append(
            {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
             "segmentation": rle, "area": float((x1 - x0) * (y1 - y0)),
             "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": crowd}
        )  # fmt: skip
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": annotations,
    }
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(data))
    name = "test_evaluation_two_images"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    DatasetCatalog.get(name)  # sets the category id mapping in the metadata
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _outputs():
    """
    Per image: a detection with a predicted mask, then one below the top 1 with an all-zero
    mask, as RetinaMask returns them with NUM_MASKS_TEST 1. Image 1's second detection scores
    above image 2's first one, so it sits inside image 2's part of the precision curve.
    """
    per_image = {
        1: [((5, 5, 30, 30), 0.9, (5, 5, 30, 30)), ((40, 40, 60, 60), 0.5, None)],
        2: [((12, 10, 40, 40), 0.3, (12, 10, 40, 40)), ((42, 40, 60, 60), 0.2, None)],
    }
    inputs, outputs = [], []
    for image_id, detections in per_image.items():
        inst = Instances((H, W))
        inst.pred_boxes = Boxes(torch.tensor([d[0] for d in detections], dtype=torch.float32))
        inst.scores = torch.tensor([d[1] for d in detections])
        inst.pred_classes = torch.zeros(len(detections), dtype=torch.int64)
        inst.pred_masks = torch.from_numpy(np.stack([_mask(d[2]) for d in detections]))
        inputs.append({"image_id": image_id})
        outputs.append({"instances": inst})
    return inputs, outputs


def _evaluate(evaluator, inputs, outputs):
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_all_zero_masks_are_false_positives_in_mask_ap(two_images):
    inputs, outputs = _outputs()
    top1 = [{"instances": o["instances"][:1]} for o in outputs]
    left_out = _evaluate(COCOEvaluator(two_images, tasks=("segm",)), inputs, top1)
    with_empty = _evaluate(COCOEvaluator(two_images, tasks=("segm",)), inputs, outputs)
    # An all-zero mask has area 0 and IoU 0 with every ground truth, the crowd one included: it
    # never matches, and counts as a false positive.
    assert with_empty["segm"]["AP"] < left_out["segm"]["AP"]

    ours = TopDetectionsCOCOEvaluator(two_images, ("segm",), num_detections=1)
    # assert_equal: the same numbers, and NaN (no object of that size) at the same places.
    np.testing.assert_equal(_evaluate(ours, inputs, outputs)["segm"], left_out["segm"])


def test_box_ap_counts_every_detection(two_images):
    inputs, outputs = _outputs()
    cfg = load_config("retinamask_R50_1x.yaml", "MODEL.RETINAMASK.NUM_MASKS_TEST", 1)
    results = _evaluate(build_coco_evaluator(cfg, two_images, None), inputs, outputs)
    plain = _evaluate(COCOEvaluator(two_images, tasks=("bbox",)), inputs, outputs)
    np.testing.assert_equal(results["bbox"], plain["bbox"])
    top1 = [{"instances": o["instances"][:1]} for o in outputs]
    top1_box_ap = _evaluate(COCOEvaluator(two_images, tasks=("bbox",)), inputs, top1)["bbox"]
    assert results["bbox"]["AP"] != top1_box_ap["AP"]
    ours = TopDetectionsCOCOEvaluator(two_images, ("segm",), num_detections=1)
    np.testing.assert_equal(results["segm"], _evaluate(ours, inputs, outputs)["segm"])

    cfg.MODEL.MASK_ON = False
    assert set(_evaluate(build_coco_evaluator(cfg, two_images, None), inputs, outputs)) == {"bbox"}


def test_reference_coco_boxes_are_the_inclusive_box_scaled_then_plus_one(two_images, tmp_path):
    # A box found in a 128x256 input, the 64x64 image scaled by 4 and 2: (40, 20, 120, 40) there
    # in detectron2's convention, whose inclusive x2, y2 are 119, 39; (10, 10, 30, 20) in the image.
    inputs, outputs = _outputs()
    inputs = [dict(inputs[0], image=torch.zeros(3, 2 * H, 4 * W))]
    instances = outputs[0]["instances"][:1]
    instances.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 30.0, 20.0]]))
    cfg = load_config("original/retinamask_R50.yaml")
    assert cfg.MODEL.RETINAMASK.COCO_BOXES == "reference"
    evaluator = build_coco_evaluator(cfg, two_images, str(tmp_path))
    _evaluate(evaluator, inputs, [{"instances": instances}])

    # The reference scales the inclusive box to the image, (10, 10, 29.75, 19.5), and writes
    # its width and height plus one (BoxList.resize, then .convert("xywh")).
    for results in ("coco_instances_results.json", "segm/coco_instances_results.json"):
        (result,) = json.loads((tmp_path / results).read_text())
        np.testing.assert_allclose(result["bbox"], [10.0, 10.0, 20.75, 10.5])
    # The evaluator's boxes only: the output it was given keeps detectron2's.
    assert instances.pred_boxes.tensor.tolist() == [[10.0, 10.0, 30.0, 20.0]]
    cfg.MODEL.RETINAMASK.COCO_BOXES = "detectron2"
    evaluator = build_coco_evaluator(cfg, two_images, str(tmp_path))
    _evaluate(evaluator, inputs, [{"instances": instances}])
    (result,) = json.loads((tmp_path / "coco_instances_results.json").read_text())
    np.testing.assert_allclose(result["bbox"], [10.0, 10.0, 20.0, 10.0])
