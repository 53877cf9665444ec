"""
COCO evaluation with the paper's protocol (Sec. 3.5): box AP over every detection (up to
``TEST.DETECTIONS_PER_IMAGE``), exactly as box-only inference gives it, and mask AP over the top
``MODEL.RETINAMASK.NUM_MASKS_TEST`` detections of each image, the ones the mask head ran on.
"""

import json
import os

from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.structures import Boxes

from .conventions import reference_coco_boxes

__all__ = ["TopDetectionsCOCOEvaluator", "build_coco_evaluator", "read_metrics_json"]


class TopDetectionsCOCOEvaluator(COCOEvaluator):
    """
    A :class:`COCOEvaluator` of the first ``num_detections`` detections of each image (the
    model sorts them by score); masks are not encoded when ``tasks`` has no "segm". With
    ``reference_boxes``, boxes are written as the reference writes them
    (:func:`reference_coco_boxes`, ``MODEL.RETINAMASK.COCO_BOXES`` "reference").

    RetinaMask's all-zero masks below its top ``NUM_MASKS_TEST`` would count as false positives
    in COCO mask AP (an RLE of area 0 has IoU 0 with any ground truth): evaluating segm on the
    top detections only leaves them out.
    """

    def __init__(
        self, dataset_name, tasks, num_detections: int = 0, reference_boxes=False, **kwargs
    ):
        """
        Args:
            dataset_name, kwargs: as for :class:`COCOEvaluator`.
            tasks (tuple[str]): "bbox" and/or "segm".
            num_detections (int): detections kept per image; <= 0 keeps all.
            reference_boxes (bool): write the reference's COCO boxes; the inputs then need
                their "image", the network's input.
        """
        super().__init__(dataset_name, tasks=tasks, **kwargs)
        self._num_detections = num_detections if num_detections > 0 else None
        self._reference_boxes = reference_boxes

    def process(self, inputs, outputs):
        kept = []
        for input, output in zip(inputs, outputs):
            # A slice is a new Instances: the other evaluator of build_coco_evaluator reads the
            # same output.
            instances = output["instances"][: self._num_detections]
            if "segm" not in self._tasks and instances.has("pred_masks"):
                instances.remove("pred_masks")
            if self._reference_boxes:
                boxes = instances.pred_boxes.tensor
                input_size = input["image"].shape[-2:]
                instances.pred_boxes = Boxes(
                    reference_coco_boxes(boxes, instances.image_size, input_size)
                )
            kept.append(dict(output, instances=instances))
        super().process(inputs, kept)


def build_coco_evaluator(cfg, dataset_name, output_folder):
    """
    The evaluator of ``train_net.py``: box AP on every detection, and with ``MODEL.MASK_ON``
    mask AP on the top ``NUM_MASKS_TEST`` of each image, its predictions written to
    ``output_folder/segm``; boxes as ``MODEL.RETINAMASK.COCO_BOXES`` says. Results are
    ``{"bbox": ..., "segm": ...}`` as COCOEvaluator's.
    """
    reference_boxes = cfg.MODEL.RETINAMASK.COCO_BOXES == "reference"
    boxes = TopDetectionsCOCOEvaluator(
        dataset_name, ("bbox",), reference_boxes=reference_boxes, output_dir=output_folder
    )
    if not cfg.MODEL.MASK_ON:
        return boxes
    masks = TopDetectionsCOCOEvaluator(
        dataset_name,
        ("segm",),
        cfg.MODEL.RETINAMASK.NUM_MASKS_TEST,
        reference_boxes=reference_boxes,
        output_dir=os.path.join(output_folder, "segm") if output_folder else None,
    )
    return DatasetEvaluators([boxes, masks])


def read_metrics_json(path):
    """
    The records (list[dict]), in file order, of the ``metrics.json`` that detectron2's
    ``JSONWriter`` writes into OUTPUT_DIR: training statistics every 20 iterations and flattened
    evaluation results ("bbox/AP", "segm/AP-bar", ...). A line cut short is skipped.
    """
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
