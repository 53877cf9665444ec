import logging
from typing import Dict, List

import torch
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import build_mask_head
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou

from .build import build_anchor_matcher, build_box_reg_loss

__all__ = ["RetinaMask"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class RetinaMask(RetinaNet):
    """
    RetinaMask (Fu, Shvets, Berg 2019): RetinaNet trained with a pluggable anchor matcher
    (best matching, Sec. 3.1), a pluggable box regression loss (self-adjusting smooth L1,
    Sec. 3.2) and a mask head fed by the detector's own top detections (Sec. 3.3, Fig. 4).

    Training returns ``loss_cls``, ``loss_box_reg`` and, with a mask head, ``loss_mask``.
    Inference returns RetinaNet's detections; with a mask head, each also has a mask, predicted
    for the top ``num_masks_test`` of them and all-zero for the rest. Without a mask head the
    test-time computation is exactly :class:`RetinaNet`'s.
    """

    @configurable
    def __init__(
        self,
        *,
        box_reg_loss: nn.Module,
        box_reg_loss_weight: float = 1.0,
        mask_pooler: ROIPooler = None,
        mask_head: nn.Module = None,
        mask_in_features: List[str] = ("p3", "p4", "p5"),
        num_mask_proposals_train: int = 100,
        mask_fg_iou_threshold: float = 0.5,
        num_masks_test: int = 50,
        clip_boxes_before_nms: bool = False,
        mask_pooler_inclusive_boxes: bool = False,
        **kwargs,
    ):
        """
        Args:
            box_reg_loss (nn.Module): called as ``box_reg_loss(pred_deltas, gt_deltas, fg_mask)``
                with (N, R, 4), (N, R, 4) and (N, R) tensors; returns the summed loss.
            box_reg_loss_weight (float): multiplies ``loss_box_reg`` (and no other loss).
            mask_pooler (ROIPooler or None): pools mask features from ``mask_in_features``.
                None (together with ``mask_head``) makes a box-only model.
            mask_head (nn.Module or None): a head of detectron2's ``ROI_MASK_HEAD_REGISTRY``.
            mask_in_features (list[str]): features the mask head pools from; must be a subset
                of ``head_in_features``.
            num_mask_proposals_train (int): top detections per image used as mask proposals
                in training (the ground-truth boxes are added to them).
            mask_fg_iou_threshold (float): a mask proposal with at least this IoU to a ground
                truth is trained on that object's mask; the others are dropped.
            num_masks_test (int): at test time, masks are predicted for this many top
                detections; the others are returned too, with all-zero masks. <= 0 means all
                detections.
            clip_boxes_before_nms (bool): clip the decoded boxes to the image before NMS, as
                the reference implementation does.
            mask_pooler_inclusive_boxes (bool): pool mask features over (x1, y1, x2 - 1,
                y2 - 1), the reference's inclusive box, rather than detectron2's (x1, y1, x2, y2).
            kwargs: arguments of :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        self.box_reg_loss = box_reg_loss
        self.box_reg_loss_weight = box_reg_loss_weight
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError("mask_pooler and mask_head must be given together, or neither.")
        missing = [f for f in mask_in_features if f not in self.head_in_features]
        if mask_head is not None and missing:
            raise ValueError(
                f"MODEL.RETINAMASK.MASK_IN_FEATURES has {missing}, which are not among "
                f"MODEL.RETINANET.IN_FEATURES {list(self.head_in_features)}; the mask head "
                "pools from the detector's own feature levels."
            )
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.mask_in_features = list(mask_in_features)
        self.num_mask_proposals_train = num_mask_proposals_train
        self.num_masks_test = num_masks_test
        self.clip_boxes_before_nms = clip_boxes_before_nms
        self.mask_pooler_inclusive_boxes = mask_pooler_inclusive_boxes
        self.mask_proposal_matcher = Matcher(
            [mask_fg_iou_threshold], [0, 1], allow_low_quality_matches=False
        )
        # RetinaNet's EMA of the number of positive anchors, kept on the device (no .item())
        # and checkpointed so that a resumed run continues with the same normalizer.
        self.register_buffer("loss_normalizer", torch.tensor(100.0))

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["anchor_matcher"] = build_anchor_matcher(cfg)
        ret["box_reg_loss"] = build_box_reg_loss(cfg)
        ret["box_reg_loss_weight"] = cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT
        ret["mask_in_features"] = cfg.MODEL.RETINAMASK.MASK_IN_FEATURES
        ret["num_mask_proposals_train"] = cfg.MODEL.RETINAMASK.NUM_MASK_PROPOSALS_TRAIN
        ret["mask_fg_iou_threshold"] = cfg.MODEL.RETINAMASK.MASK_FG_IOU_THRESHOLD
        ret["num_masks_test"] = cfg.MODEL.RETINAMASK.NUM_MASKS_TEST
        ret["clip_boxes_before_nms"] = cfg.MODEL.RETINAMASK.CLIP_BOXES_BEFORE_NMS
        ret["mask_pooler_inclusive_boxes"] = cfg.MODEL.RETINAMASK.MASK_POOLER_INCLUSIVE_BOXES
        if cfg.MODEL.MASK_ON:
            ret.update(cls._init_mask_branch(cfg, ret["backbone"].output_shape()))
        return ret

    @classmethod
    def _init_mask_branch(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = cfg.MODEL.RETINAMASK.MASK_IN_FEATURES
        channels = {input_shape[f].channels for f in in_features}
        assert len(channels) == 1, channels
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
        # The mask head predicts one mask per detector class; detectron2's mask heads read the
        # class count from ROI_HEADS, so take it from RETINANET instead of asking for it twice.
        mask_cfg = cfg.clone()
        mask_cfg.defrost()
        mask_cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES
        head = build_mask_head(
            mask_cfg, ShapeSpec(channels=channels.pop(), width=resolution, height=resolution)
        )
        return {"mask_pooler": pooler, "mask_head": head}

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
        RetinaNet's losses with the box regression loss taken from ``self.box_reg_loss`` and
        scaled by ``self.box_reg_loss_weight``. Ignored anchors are masked out rather than
        indexed away, so no step here waits for the device. Arguments and return value are
        those of :meth:`RetinaNet.losses`.
        """
        gt_labels = torch.stack(gt_labels)  # (N, R)
        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().to(self.loss_normalizer.dtype)
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
        return {
            "loss_cls": loss_cls / normalizer,
            "loss_box_reg": loss_box_reg * self.box_reg_loss_weight / normalizer,
        }

    def _decode_per_level_predictions(self, anchors, pred_scores, pred_deltas, *args, **kwargs):
        pred = super()._decode_per_level_predictions(
            anchors, pred_scores, pred_deltas, *args, **kwargs
        )
        if self.clip_boxes_before_nms:
            pred.pred_boxes.clip(pred.image_size)
        return pred

    @torch.no_grad()
    def _detect_mask_proposals(self, anchors, pred_logits, pred_anchor_deltas, image_sizes):
        """
        Run the detector's own inference post-processing (score threshold, per-level top-k,
        class-wise NMS) on the detached predictions and keep the top
        ``num_mask_proposals_train`` detections of each image (Sec. 3.4).

        Returns:
            list[Instances]: per image, ``pred_boxes``, ``scores`` and ``pred_classes``.
        """
        proposals = []
        for img_idx, image_size in enumerate(image_sizes):
            pred = self._decode_multi_level_predictions(
                anchors,
                [x[img_idx].detach().sigmoid() for x in pred_logits],
                [x[img_idx].detach() for x in pred_anchor_deltas],
                self.test_score_thresh,
                self.test_topk_candidates,
                image_size,
            )
            keep = batched_nms(
                pred.pred_boxes.tensor, pred.scores, pred.pred_classes, self.test_nms_thresh
            )
            proposals.append(pred[keep[: self.num_mask_proposals_train]])
        return proposals

    def _forward_mask_training(self, features, proposals, gt_instances):
        """
        Match the detections plus the ground-truth boxes to the ground truth, and train the mask
        head on the foreground ones (Sec. 3.4: "the number of mask proposals is (100+Gt)").
        """
        mask_instances = []
        for proposals_i, gt_i in zip(proposals, gt_instances):
            boxes = Boxes.cat([proposals_i.pred_boxes, gt_i.gt_boxes])
            matched_idxs, labels = self.mask_proposal_matcher(pairwise_iou(gt_i.gt_boxes, boxes))
            fg = labels == 1
            instances = Instances(gt_i.image_size, proposal_boxes=boxes[fg])
            if len(gt_i) > 0:
                if not gt_i.has("gt_masks"):
                    raise ValueError(
                        "MODEL.MASK_ON is True but the training instances have no 'gt_masks'. "
                        "Train on a dataset with 'segmentation' annotations, or set "
                        "MODEL.MASK_ON False for a box-only RetinaMask."
                    )
                instances.gt_classes = gt_i.gt_classes[matched_idxs[fg]]
                instances.gt_masks = gt_i.gt_masks[matched_idxs[fg]]
            mask_instances.append(instances)

        boxes = self._pooler_boxes([x.proposal_boxes for x in mask_instances])
        x = self.mask_pooler(self._mask_features(features), boxes)
        return self.mask_head(x, mask_instances)

    def _pooler_boxes(self, boxes: List[Boxes]) -> List[Boxes]:
        # The reference's boxes are inclusive: its RoIAlign sees detectron2's x2 - 1, y2 - 1.
        if not self.mask_pooler_inclusive_boxes:
            return boxes
        return [Boxes(b.tensor - b.tensor.new_tensor([0.0, 0.0, 1.0, 1.0])) for b in boxes]

    def _mask_features(self, features: List[Tensor]) -> List[Tensor]:
        by_name = dict(zip(self.head_in_features, features))
        return [by_name[f] for f in self.mask_in_features]

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ):
        """
        RetinaNet's detections, unchanged (up to ``TEST.DETECTIONS_PER_IMAGE`` per image, sorted
        by score), so that box AP is that of box-only inference, as the paper reports it. With a
        mask head, each also has ``pred_masks``, (R, 1, M, M) probabilities: the mask head runs
        on the top ``num_masks_test`` only (Sec. 3.5: "we use the top 50 bounding box
        predictions as mask proposals"), and the others get all-zero masks, which
        :func:`retinamask_d2.evaluation.build_coco_evaluator` leaves out of mask AP.
        """
        results = super().forward_inference(images, features, predictions)
        if not self.mask_on:
            return results
        if self.num_masks_test <= 0:
            x = self.mask_pooler(
                self._mask_features(features), self._pooler_boxes([r.pred_boxes for r in results])
            )
            return self.mask_head(x, results)
        top = [r[: self.num_masks_test] for r in results]
        x = self.mask_pooler(
            self._mask_features(features), self._pooler_boxes([r.pred_boxes for r in top])
        )
        top = self.mask_head(x, top)
        for r, t in zip(results, top):
            # Zeros as long as a slice, not a counted length: a traced graph stays dynamic.
            rest = r.scores[self.num_masks_test :]
            zeros = torch.zeros_like(rest)[:, None, None, None].expand(-1, *t.pred_masks.shape[1:])
            r.pred_masks = torch.cat([t.pred_masks, zeros.to(t.pred_masks.dtype)])
        return results
