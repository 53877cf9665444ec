import math
from typing import Dict, List

import torch
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ROIAlign, ShapeSpec, cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import build_mask_head
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou

from .box_reg_loss import DeferredScalars
from .build import build_anchor_matcher, build_box_reg_loss
from .config import InputError, check_choice
from .conventions import InclusiveBoxROIAlign, ReferencePastedMasks

__all__ = ["RetinaMask"]


@META_ARCH_REGISTRY.register()
class RetinaMask(RetinaNet):
    """
    RetinaMask (Fu, Shvets, Berg 2019): RetinaNet trained with a pluggable anchor matcher
    (best matching, Sec. 3.1), a pluggable box regression loss (self-adjusting smooth L1,
    Sec. 3.2) and a mask head fed by the detector's own top detections (Sec. 3.3, Fig. 4).

    Training returns ``loss_cls``, ``loss_box_reg`` and, with a mask head, ``loss_mask``.
    Inference is :class:`RetinaNet`'s, less the detections of zero area inside the image, plus
    masks with a mask head.
    """

    @configurable
    def __init__(
        self,
        *,
        box_reg_loss: nn.Module,
        box_reg_loss_weight: float = 1.0,
        loss_cls_normalizer: str = "positives",
        mask_pooler: ROIPooler = None,
        mask_head: nn.Module = None,
        mask_in_features: List[str] = ("p3", "p4", "p5"),
        num_mask_proposals_train: int = 100,
        mask_fg_iou_threshold: float = 0.5,
        num_masks_test: int = 50,
        clip_before_nms: bool = False,
        inclusive_mask_boxes: bool = False,
        mask_paste: str = "detectron2",
        **kwargs,
    ):
        """
        Args:
            box_reg_loss (nn.Module): called as ``box_reg_loss(pred_deltas, gt_deltas, fg_mask)``
                with (N, R, 4), (N, R, 4) and (N, R) tensors; returns the summed loss.
            box_reg_loss_weight (float): multiplies ``loss_box_reg`` (and no other loss).
            loss_cls_normalizer (str): "positives": ``loss_cls`` is divided by the EMA of the
                number of positive anchors, as ``loss_box_reg``; "positives+images": by that
                plus the number of images, as the reference.
            mask_pooler, mask_head: an ROIPooler of ``mask_in_features`` and a head of
                ``ROI_MASK_HEAD_REGISTRY``; both None for a box-only model.
            mask_in_features (list[str]): consecutive levels of ``head_in_features``.
            num_mask_proposals_train (int): top detections per image used as mask proposals
                in training, besides the ground-truth boxes.
            mask_fg_iou_threshold (float): a mask proposal with at least this IoU to a ground
                truth is trained on that object's mask; the others are dropped.
            num_masks_test (int): masks are predicted for this many top detections, the rest
                get all-zero masks; <= 0 means all.
            clip_before_nms (bool): clip decoded boxes to the image before NMS (the
                reference's order), at test time and for the training mask proposals.
            inclusive_mask_boxes (bool): ``mask_pooler`` pools over inclusive boxes
                (:class:`InclusiveBoxROIAlign`); mask targets are rasterised in them too.
            mask_paste (str): "detectron2" or "reference" (:class:`ReferencePastedMasks`).
            kwargs: arguments of :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        self.box_reg_loss = box_reg_loss
        self.box_reg_loss_weight = box_reg_loss_weight
        check_choice("MODEL.RETINAMASK.LOSS_CLS_NORMALIZER", loss_cls_normalizer)
        self.loss_cls_adds_images = loss_cls_normalizer == "positives+images"
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.mask_in_features = list(mask_in_features)
        self.num_mask_proposals_train = num_mask_proposals_train
        self.num_masks_test = num_masks_test
        self.clip_before_nms = clip_before_nms
        self.inclusive_mask_boxes = inclusive_mask_boxes
        check_choice("MODEL.RETINAMASK.MASK_PASTE", mask_paste)
        self.mask_paste = mask_paste
        self.mask_proposal_matcher = Matcher([mask_fg_iou_threshold], [0, 1])
        # RetinaNet's EMA of the number of positive anchors, kept on the device (no .item())
        # and checkpointed so that a resumed run continues with the same normalizer.
        self.register_buffer("loss_normalizer", torch.tensor(100.0))
        self._num_pos_anchors_log = DeferredScalars()

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["anchor_matcher"] = build_anchor_matcher(cfg)
        ret["box_reg_loss"] = build_box_reg_loss(cfg)
        ret["box_reg_loss_weight"] = cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT
        ret["loss_cls_normalizer"] = cfg.MODEL.RETINAMASK.LOSS_CLS_NORMALIZER
        ret["mask_in_features"] = cfg.MODEL.RETINAMASK.MASK_IN_FEATURES
        ret["num_mask_proposals_train"] = cfg.MODEL.RETINAMASK.NUM_MASK_PROPOSALS_TRAIN
        ret["mask_fg_iou_threshold"] = cfg.MODEL.RETINAMASK.MASK_FG_IOU_THRESHOLD
        ret["num_masks_test"] = cfg.MODEL.RETINAMASK.NUM_MASKS_TEST
        ret["clip_before_nms"] = cfg.MODEL.RETINAMASK.CLIP_BEFORE_NMS
        ret["inclusive_mask_boxes"] = cfg.MODEL.RETINAMASK.INCLUSIVE_MASK_BOXES
        ret["mask_paste"] = cfg.MODEL.RETINAMASK.MASK_PASTE
        if cfg.MODEL.MASK_ON:
            ret.update(cls._init_mask_branch(cfg, ret["backbone"].output_shape()))
        return ret

    @classmethod
    def _init_mask_branch(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.RETINAMASK.MASK_IN_FEATURES
        _check_mask_in_features(in_features, cfg.MODEL.RETINANET.IN_FEATURES, input_shape)
        resolution = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        # Eq. 3: level k = floor(4 + log2(sqrt(wh) / 224)), clamped to the pooled levels.
        pooler = ROIPooler(
            output_size=resolution,
            scales=tuple(1.0 / input_shape[f].stride for f in in_features),
            sampling_ratio=cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE,
            canonical_box_size=224,
            canonical_level=4,
        )
        if cfg.MODEL.RETINAMASK.INCLUSIVE_MASK_BOXES:
            # The level stays the pooler's choice, from the box as given (the reference's).
            if not all(type(op) is ROIAlign for op in pooler.level_poolers):
                raise InputError(
                    "MODEL.RETINAMASK.INCLUSIVE_MASK_BOXES needs ROI_MASK_HEAD.POOLER_TYPE "
                    '"ROIAlign" (the reference\'s) or "ROIAlignV2", not '
                    f"{cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE!r}."
                )
            pooler.level_poolers = nn.ModuleList(
                InclusiveBoxROIAlign(
                    op.output_size, op.spatial_scale, op.sampling_ratio, op.aligned
                )
                for op in pooler.level_poolers
            )
        # The mask head predicts one mask per detector class; detectron2's mask heads read the
        # class count from ROI_HEADS, so take it from RETINANET instead of asking for it twice.
        mask_cfg = cfg.clone()
        mask_cfg.defrost()
        mask_cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES
        channels = input_shape[in_features[0]].channels
        shape = ShapeSpec(channels=channels, width=resolution, height=resolution)
        return {"mask_pooler": pooler, "mask_head": build_mask_head(mask_cfg, shape)}

    @property
    def mask_on(self) -> bool:
        return self.mask_head is not None

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_anchor_deltas = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4]
        )
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        losses = self.losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        if self.mask_on:
            proposals = self._detect_mask_proposals(
                anchors, pred_logits, pred_anchor_deltas, images.image_sizes
            )
            losses.update(self._forward_mask_training(features, proposals, gt_instances))
        return losses

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """
        :meth:`RetinaNet.losses` with ``self.box_reg_loss`` scaled by ``box_reg_loss_weight``
        and, with ``loss_cls_normalizer`` "positives+images", the number of images added to
        what divides ``loss_cls``. Ignored anchors are masked out rather than indexed away, and ``num_pos_anchors`` reaches
        the event storage one step late, so that no step waits for the device.
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().to(self.loss_normalizer.dtype)
        self._num_pos_anchors_log.put(["num_pos_anchors"], (num_pos_anchors / num_images)[None])
        # As RetinaNet._ema_update: momentum 0.9 over max(#positives, 1).
        self.loss_normalizer.lerp_(num_pos_anchors.clamp(min=1), 0.1)
        normalizer = self.loss_normalizer.clone()

        # Ignored anchors get the background class; their loss is zeroed below.
        target_classes = torch.where(valid_mask, gt_labels, self.num_classes)
        gt_labels_target = F.one_hot(target_classes, num_classes=self.num_classes + 1)[..., :-1]
        loss_cls = sigmoid_focal_loss_jit(
            cat(pred_logits, dim=1),
            gt_labels_target.to(pred_logits[0].dtype),
            alpha=self.focal_loss_alpha,
            gamma=self.focal_loss_gamma,
            reduction="none",
        )
        loss_cls = (loss_cls * valid_mask.unsqueeze(-1)).sum()

        anchors = type(anchors[0]).cat(anchors).tensor  # (R, 4)
        gt_anchor_deltas = torch.stack(
            [self.box2box_transform.get_deltas(anchors, k) for k in gt_boxes]
        )
        loss_box_reg = self.box_reg_loss(cat(pred_anchor_deltas, dim=1), gt_anchor_deltas, pos_mask)
        cls_normalizer = normalizer + num_images if self.loss_cls_adds_images else normalizer
        return {
            "loss_cls": loss_cls / cls_normalizer,
            "loss_box_reg": loss_box_reg * self.box_reg_loss_weight / normalizer,
        }

    def _decode_per_level_predictions(
        self, anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size
    ):
        """
        The parent's method. With ``clip_before_nms``, every box is kept and clipped as the
        reference clips its inclusive boxes, to [0, w - 1] x [0, h - 1] (rpn/retinanet_infer.py,
        ``clip_to_image(remove_empty=False)``): a box outside the image becomes one pixel wide
        at its border. Without it, the boxes of no area inside the image (no mask, no RoI to
        pool) are dropped: their scores go to -inf, below ``score_thresh``, before the top-k and
        NMS. Not Boxes.clip, whose finiteness check waits for the device; a NaN box fails the
        comparison and is dropped too.
        """
        h, w = image_size
        if not self.clip_before_nms:
            boxes = self.box2box_transform.apply_deltas(pred_deltas, anchors.tensor)  # (HWA, 4)
            nonempty = (boxes[:, 2].clamp(max=w) > boxes[:, 0].clamp(min=0)) & (
                boxes[:, 3].clamp(max=h) > boxes[:, 1].clamp(min=0)
            )
            pred_scores = pred_scores.masked_fill(~nonempty[:, None], float("-inf"))
        pred = super()._decode_per_level_predictions(
            anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size
        )
        if self.clip_before_nms:
            # Inclusive x2 in [0, w - 1] is x2 in [1, w] here. Clamped to w and h as they are:
            # a traced graph keeps the image size an input (a tensor made from them would be a
            # constant of the traced size).
            x1, y1, x2, y2 = pred.pred_boxes.tensor.unbind(dim=1)
            pred.pred_boxes.tensor = torch.stack(
                [
                    x1.clamp(min=0, max=w - 1),
                    y1.clamp(min=0, max=h - 1),
                    x2.clamp(min=1, max=w),
                    y2.clamp(min=1, max=h),
                ],
                dim=1,
            )
        return pred

    @torch.no_grad()
    def _detect_mask_proposals(self, anchors, pred_logits, pred_anchor_deltas, image_sizes):
        """
        Sec. 3.4: the mask proposals are the detector's own top ``num_mask_proposals_train``
        detections (RetinaNet's inference on the detached predictions).

        Args:
            anchors (list[Boxes]): per level, (Hi * Wi * A, 4) anchors.
            pred_logits, pred_anchor_deltas (list[Tensor]): per level, (N, Hi * Wi * A, K)
                classification logits and (N, Hi * Wi * A, 4) box deltas.
            image_sizes (list[tuple[int, int]]): (H, W) of each image.

        Returns:
            list[Instances]: per image, ``pred_boxes``, ``scores`` and ``pred_classes``.
        """
        # inference_single_image keeps the top max_detections_per_image after NMS.
        max_detections_per_image = self.max_detections_per_image
        self.max_detections_per_image = self.num_mask_proposals_train
        try:
            return [
                self.inference_single_image(
                    anchors,
                    [x[i].detach().sigmoid() for x in pred_logits],
                    [x[i].detach() for x in pred_anchor_deltas],
                    image_size,
                )
                for i, image_size in enumerate(image_sizes)
            ]
        finally:
            self.max_detections_per_image = max_detections_per_image

    def _forward_mask_training(self, features, proposals, gt_instances):
        """
        Train the mask head on the detections plus the ground-truth boxes that match a ground
        truth (Sec. 3.4: "the number of mask proposals is (100+Gt)").
        """
        mask_instances, pooled_boxes = [], []
        for proposals_i, gt_i in zip(proposals, gt_instances):
            boxes = Boxes.cat([proposals_i.pred_boxes, gt_i.gt_boxes])
            matched_idxs, labels = self.mask_proposal_matcher(pairwise_iou(gt_i.gt_boxes, boxes))
            fg = labels == 1
            pooled_boxes.append(boxes[fg])
            if self.inclusive_mask_boxes:
                # The targets are rasterised in the box the features are pooled over.
                boxes = Boxes(boxes.tensor - boxes.tensor.new_tensor([0.0, 0.0, 1.0, 1.0]))
            instances = Instances(gt_i.image_size, proposal_boxes=boxes[fg])
            if len(gt_i) > 0:
                if not gt_i.has("gt_masks"):
                    raise InputError(
                        "MODEL.MASK_ON is True but the training instances have no 'gt_masks'. "
                        "Train on a dataset with 'segmentation' annotations, or set "
                        "MODEL.MASK_ON False for a box-only RetinaMask."
                    )
                instances.gt_classes = gt_i.gt_classes[matched_idxs[fg]]
                instances.gt_masks = gt_i.gt_masks[matched_idxs[fg]]
            mask_instances.append(instances)

        x = self._pool_mask_features(features, pooled_boxes)
        return self.mask_head(x, mask_instances)

    def _pool_mask_features(self, features: List[Tensor], boxes: List[Boxes]) -> Tensor:
        """Returns (R, C, M, M) features of the boxes of all images, from mask_in_features."""
        by_name = dict(zip(self.head_in_features, features))
        return self.mask_pooler([by_name[f] for f in self.mask_in_features], boxes)

    def forward_inference(self, images: ImageList, features: List[Tensor], predictions):
        """
        RetinaNet's detections, so that box AP is that of box-only inference, as the paper
        reports it. With a mask head, each also has ``pred_masks``, (R, 1, M, M) probabilities,
        predicted for the top ``num_masks_test`` (Sec. 3.5: "we use the top 50 bounding box
        predictions as mask proposals"); the others are all zero, which
        :func:`retinamask_d2.evaluation.build_coco_evaluator` leaves out of mask AP. With
        ``mask_paste`` "reference" they are :class:`ReferencePastedMasks`, which
        ``detector_postprocess`` pastes as the reference does.
        """
        results = super().forward_inference(images, features, predictions)
        if not self.mask_on:
            return results
        n = self.num_masks_test
        top = [r[:n] for r in results] if n > 0 else results
        x = self._pool_mask_features(features, [r.pred_boxes for r in top])
        top = self.mask_head(x, top)
        if n > 0:
            for r, t in zip(results, top):
                # Zeros as long as a slice, not a counted length: a traced graph stays dynamic.
                zeros = torch.zeros_like(r.scores[n:], dtype=t.pred_masks.dtype)
                zeros = zeros[:, None, None, None].expand(-1, *t.pred_masks.shape[1:])
                r.pred_masks = torch.cat([t.pred_masks, zeros])
        else:
            results = top
        if self.mask_paste == "reference":
            for r in results:
                r.pred_masks = ReferencePastedMasks(r.pred_masks[:, 0], r.image_size)
        return results


def _check_mask_in_features(features: List[str], head_in_features, input_shape):
    # Eq. 3 gives each box one level of a contiguous range, and every box over 448 pixels P5,
    # the coarsest level the paper pools masks from (Sec. 3.3, Table 3).
    unknown = [f for f in features if f not in head_in_features]
    levels = [math.log2(input_shape[f].stride) for f in features if f not in unknown]
    too_coarse = [f for f, level in zip(features, levels) if level > 5]
    if not features:
        problem = "is empty, but the mask head needs levels to pool from"
    elif unknown:
        problem = (
            f"has {unknown}, which the detector does not compute (MODEL.RETINANET.IN_FEATURES "
            f"is {list(head_in_features)}); the mask head pools from the detector's own levels"
        )
    elif any(b - a != 1 for a, b in zip(levels, levels[1:])):
        problem = f"= {list(features)} are not consecutive FPN levels from fine to coarse"
    elif too_coarse:
        problem = f"has {too_coarse}, coarser than P5: Eq. 3 gives P5 every box over 448 pixels"
    else:
        return
    raise InputError(
        f"MODEL.RETINAMASK.MASK_IN_FEATURES {problem}. Set it to consecutive levels up to P5 of "
        'MODEL.RETINANET.IN_FEATURES, e.g. ["p3", "p4", "p5"] as in the paper, or set '
        "MODEL.MASK_ON False."
    )
