"""
Test-time and RoI conventions that detectron2 and the authors' code (maskrcnn-benchmark) have
differently, each chosen by a key of ``MODEL.RETINAMASK``: the test-time resize
(``TEST_RESIZE``), the paste of the 28x28 masks into the image (``MASK_PASTE``), the boxes
the mask head pools from and is trained on (``INCLUSIVE_MASK_BOXES``) and the boxes of the COCO
results (``COCO_BOXES``). Everything is built from detectron2's own pieces; the reference's
values reproduce its released models exactly.
"""

from typing import Tuple

import torch
from PIL import Image

from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.layers import ROIAlign
from detectron2.layers.mask_ops import pad_masks, paste_mask_in_image_old, scale_boxes
from detectron2.structures import BitMasks, Boxes, ROIMasks

from .config import check_choice

__all__ = [
    "InclusiveBoxROIAlign",
    "Predictor",
    "ReferencePastedMasks",
    "ReferenceResizeShortestEdge",
    "build_test_resize",
    "reference_coco_boxes",
]


class ReferenceResizeShortestEdge(T.Augmentation):
    """
    The reference's test-time resize (maskrcnn_benchmark/data/transforms/transforms.py,
    ``Resize.get_size``): the short side becomes ``short_edge_length`` and the long side is
    floored, where detectron2's :class:`ResizeShortestEdge` rounds both; if the long side would
    exceed ``max_size``, the short side is rounded down to fit first.
    """

    def __init__(self, short_edge_length: int, max_size: int, interp=Image.BILINEAR):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.short_edge_length == 0:
            return T.NoOpTransform()
        newh, neww = self.get_output_shape(h, w, self.short_edge_length, self.max_size)
        return T.ResizeTransform(h, w, newh, neww, self.interp)

    @staticmethod
    def get_output_shape(oldh: int, oldw: int, short_edge_length: int, max_size: int):
        """Returns (newh, neww), e.g. (800, 1202) for a 300x451 image at 800 (1203 in detectron2)."""
        short, long = min(oldh, oldw), max(oldh, oldw)
        size = short_edge_length
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
        if short == size:
            return oldh, oldw
        if oldw < oldh:
            return int(size * oldh / oldw), size
        return size, int(size * oldw / oldh)


def build_test_resize(cfg) -> T.Augmentation:
    """
    The test-time resize of ``cfg`` (INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST), as
    ``MODEL.RETINAMASK.TEST_RESIZE`` names it: detectron2's ``ResizeShortestEdge`` or the
    reference's. The evaluation loader of ``train_net.py``, ``demo/demo.py`` and
    :class:`Predictor` all resize with it.
    """
    kind = cfg.MODEL.RETINAMASK.TEST_RESIZE
    check_choice("MODEL.RETINAMASK.TEST_RESIZE", kind)
    size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    if kind == "reference":
        return ReferenceResizeShortestEdge(size, max_size)
    return T.ResizeShortestEdge([size, size], max_size)


class Predictor(DefaultPredictor):
    """
    detectron2's :class:`DefaultPredictor`, resizing its input with :func:`build_test_resize`
    (``MODEL.RETINAMASK.TEST_RESIZE``) rather than always with ``ResizeShortestEdge``.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.aug = build_test_resize(cfg)


class ReferencePastedMasks(ROIMasks):
    """
    (N, M, M) mask probabilities of RoIs in an image of ``input_size``, pasted by
    :meth:`to_bitmasks` as the reference's ``Masker`` pastes them: each mask padded by one cell,
    its box (the reference's inclusive box, scaled to the output image) enlarged to match,
    truncated to whole pixels, and the mask resized into it with PIL's bilinear filter. This is
    detectron2's ``paste_mask_in_image_old`` with ``pad_masks`` and ``scale_boxes``.
    ``detector_postprocess`` calls it with the boxes scaled to the output image.
    """

    def __init__(self, tensor: torch.Tensor, input_size: Tuple[int, int]):
        super().__init__(tensor)
        self.input_size = input_size

    def to(self, device):
        return type(self)(self.tensor.to(device), self.input_size)

    def __getitem__(self, item):
        return type(self)(super().__getitem__(item).tensor, self.input_size)

    def to_bitmasks(self, boxes, height, width, threshold=0.5):
        boxes = boxes.tensor if isinstance(boxes, Boxes) else boxes
        # The reference scales its inclusive x2 = x2 - 1 of the input image to the output.
        scale = boxes.new_tensor([width / self.input_size[1], height / self.input_size[0]])
        boxes = boxes - torch.cat([scale.new_zeros(2), scale])
        masks, padding_scale = pad_masks(self.tensor, 1)
        boxes = scale_boxes(boxes, padding_scale)
        # A box under one pixel wide or high turns inverted above, and the reference pastes
        # nothing for it (detectron2's function would fail on its negative size).
        inverted = (boxes[:, 2:].int() < boxes[:, :2].int()).any(dim=1).tolist()
        empty = torch.zeros((height, width), dtype=torch.uint8)
        pasted = [
            empty if skip else paste_mask_in_image_old(m, b, height, width, threshold)
            for m, b, skip in zip(masks, boxes, inverted)
        ]
        return BitMasks(torch.stack(pasted) if pasted else empty[None, :0])


def reference_coco_boxes(boxes: torch.Tensor, image_size, input_size) -> torch.Tensor:
    """
    (R, 4) boxes in an image of ``image_size`` (h, w), found in the network's input of
    ``input_size``, moved so that detectron2's conversion to COCO's (x, y, w, h) gives the
    reference's. The reference scales its inclusive box (x2 - 1 here, in the input) to the
    image and adds one to its width and height there; here x2 is scaled with its one, so the
    reference's width is this width + 1 - (image width / input width).
    """
    scale = boxes.new_tensor([image_size[1] / input_size[1], image_size[0] / input_size[0]])
    return boxes + torch.cat([scale.new_zeros(2), 1 - scale])


class InclusiveBoxROIAlign(ROIAlign):
    """
    ROIAlign over the reference's inclusive boxes (x1, y1, x2 - 1, y2 - 1). ``ROIPooler`` picks
    each box's level of Eq. 3 before calling it, from the box as given: that is the area the
    reference's ``LevelMapper`` computes from its inclusive box with its +1.
    """

    def forward(self, input, rois):
        # rois: (R, 5), batch index then x1, y1, x2, y2.
        return super().forward(input, rois - rois.new_tensor([0.0, 0.0, 0.0, 1.0, 1.0]))
