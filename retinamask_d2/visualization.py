"""
What demo/demo.py draws: detections of a trained model on an image, with memory bounded for huge
inputs and without the clutter of overlapping boxes of different classes.
"""

import numpy as np
import torch
from detectron2.layers import nms
from detectron2.utils.visualizer import Visualizer

__all__ = ["remove_overlaps", "draw_instances"]


def remove_overlaps(instances, iou_threshold: float):
    """
    Keep, among detections that overlap with IoU above ``iou_threshold`` whatever their class,
    the highest-scoring one. RetinaNet's NMS is per class, so one object can be detected once
    per class it resembles.
    """
    if iou_threshold >= 1 or len(instances) == 0:
        return instances
    keep = nms(instances.pred_boxes.tensor, instances.scores, iou_threshold)
    return instances[torch.sort(keep).values]


def draw_instances(image: np.ndarray, instances, metadata, scale: float, max_side: int = 2000):
    """
    Draw ``instances`` (on CPU) on ``image`` (H, W, 3, BGR), enlarged by ``scale`` but never
    beyond ``max_side`` pixels on the long side.

    Returns:
        VisImage
    """
    scale = min(scale, max_side / max(image.shape[:2]))
    return Visualizer(image[:, :, ::-1], metadata, scale=scale).draw_instance_predictions(instances)
