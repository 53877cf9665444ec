import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import build_mask_head
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import get_event_storage

from .build import build_anchor_matcher, build_box_reg_loss
from .config import InputError

__all__ = ["RetinaMask"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class RetinaMask(RetinaNet):
    """
    RetinaMask (Fu, Shvets, Berg 2019): RetinaNet trained with a pluggable anchor matcher
    (best matching, Sec. 3.1), a pluggable box regression loss (self-adjusting smooth L1,
    Sec. 3.2) and a mask head fed by the detector's own top detections (Sec. 3.3, Fig. 4).

    Training returns ``loss_cls``, ``loss_box_reg`` and, with a mask head, ``loss_mask``.
    Inference returns RetinaNet's detections, less those of zero area inside the image; with a
    mask head, each also has a mask, predicted for the top ``num_masks_test`` of them and
    all-zero for the rest. Without a mask head the test-time computation is otherwise
    :class:`RetinaNet`'s.
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
                of ``head_in_features`` (:meth:`from_config` checks the full rule).
            num_mask_proposals_train (int): top detections per image used as mask proposals
                in training (the ground-truth boxes are added to them).
            mask_fg_iou_threshold (float): a mask proposal with at least this IoU to a ground
                truth is trained on that object's mask; the others are dropped.
            num_masks_test (int): at test time, masks are predicted for this many top
                detections; the others are returned too, with all-zero masks. <= 0 means all
                detections.
            kwargs: arguments of :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        self.box_reg_loss = box_reg_loss
        self.box_reg_loss_weight = box_reg_loss_weight
        if (mask_pooler is None) != (mask_head is None):
            raise ValueError("mask_pooler and mask_head must be given together, or neither.")
        missing = [f for f in mask_in_features if f not in self.head_in_features]
        if mask_head is not None and missing:
            raise InputError(
                f"MODEL.RETINAMASK.MASK_IN_FEATURES has {missing}, which are not among "
                f"MODEL.RETINANET.IN_FEATURES {list(self.head_in_features)}; the mask head "
                "pools from the detector's own feature levels."
            )
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head
        self.mask_in_features = list(mask_in_features)
        self.num_mask_proposals_train = num_mask_proposals_train
        self.num_masks_test = num_masks_test
        self.mask_proposal_matcher = Matcher(
            [mask_fg_iou_threshold], [0, 1], allow_low_quality_matches=False
        )
        # RetinaNet's EMA of the number of positive anchors, kept on the device (no .item())
        # and checkpointed so that a resumed run continues with the same normalizer.
        self.register_buffer("loss_normalizer", torch.tensor(100.0))
        # The last step's positive-anchor count on its way to the host: (count, event, iter).
        self._pending_num_pos_anchors: Optional[Tuple[Tensor, object, int]] = None

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
        # The mask head predicts one mask per detector class; detectron2's mask heads read the
        # class count from ROI_HEADS, so take it from RETINANET instead of asking for it twice.
        mask_cfg = cfg.clone()
        mask_cfg.defrost()
        mask_cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES
        channels = input_shape[in_features[0]].channels
        head = build_mask_head(
            mask_cfg, ShapeSpec(channels=channels, width=resolution, height=resolution)
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
        indexed away, and ``num_pos_anchors`` reaches the event storage one step late, so no
        step here waits for the device. Arguments and return value are those of
        :meth:`RetinaNet.losses`.
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        valid_mask = gt_labels >= 0
        pos_mask = valid_mask & (gt_labels != self.num_classes)
        num_pos_anchors = pos_mask.sum().to(self.loss_normalizer.dtype)
        self._log_num_pos_anchors(num_pos_anchors / num_images)
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

    def _log_num_pos_anchors(self, num_pos_per_image: Tensor):
        """
        Put RetinaNet's ``num_pos_anchors`` scalar (positive anchors per image) into the event
        storage, as :meth:`RetinaNet.losses` does, but without its ``.item()``: the count is
        copied to the host without blocking, and the next training step puts it into the
        storage under the iteration it belongs to.
        """
        try:
            storage = get_event_storage()
        except AssertionError:  # no EventStorage: training outside a trainer, nothing to log
            return
        if self._pending_num_pos_anchors is not None:
            host, event, it = self._pending_num_pos_anchors
            if event is not None:
                event.synchronize()  # recorded a whole step ago
            storage.put_scalar("num_pos_anchors", host.item(), cur_iter=it)
        host = num_pos_per_image.detach().to("cpu", non_blocking=True, copy=True)
        event = None
        if num_pos_per_image.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending_num_pos_anchors = (host, event, storage.iter)

    def _decode_per_level_predictions(
        self, anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size
    ):
        """
        :meth:`DenseDetector._decode_per_level_predictions`, without the anchors whose box has
        no area inside the image (width or height <= 0 once clipped to ``image_size``): an
        empty box has no mask to predict and no RoI to pool. Their scores are pushed below
        ``score_thresh``, so the threshold's own selection drops them, before the top-k and
        NMS, without another host-device sync. Arguments and return value are those of the
        parent method.
        """
        boxes = self.box2box_transform.apply_deltas(pred_deltas, anchors.tensor)  # (HWA, 4)
        h, w = image_size
        # min(x2, w) > max(x1, 0) is "clipped width > 0", without Boxes.clip's finiteness check,
        # which waits for the device; a NaN box fails the comparison and is dropped too.
        nonempty = (boxes[:, 2].clamp(max=w) > boxes[:, 0].clamp(min=0)) & (
            boxes[:, 3].clamp(max=h) > boxes[:, 1].clamp(min=0)
        )
        pred_scores = pred_scores.masked_fill(~nonempty[:, None], float("-inf"))
        return super()._decode_per_level_predictions(
            anchors, pred_scores, pred_deltas, score_thresh, topk_candidates, image_size
        )

    @torch.no_grad()
    def _detect_mask_proposals(self, anchors, pred_logits, pred_anchor_deltas, image_sizes):
        """
        The detector's own detections on the detached predictions (RetinaNet's inference:
        score threshold, per-level top-k, class-wise NMS), the top
        ``num_mask_proposals_train`` of each image (Sec. 3.4).

        Args:
            anchors (list[Boxes]): per level, (Hi * Wi * A, 4) anchors.
            pred_logits, pred_anchor_deltas (list[Tensor]): per level, (N, Hi * Wi * A, K)
                classification logits and (N, Hi * Wi * A, 4) box deltas.
            image_sizes (list[tuple[int, int]]): (H, W) of each image.

        Returns:
            list[Instances]: per image, ``pred_boxes``, ``scores`` and ``pred_classes``.
        """
        # RetinaNet.inference_single_image keeps the top max_detections_per_image after NMS;
        # the mask proposals are the top num_mask_proposals_train instead.
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

        x = self.mask_pooler(
            self._mask_features(features), [x.proposal_boxes for x in mask_instances]
        )
        return self.mask_head(x, mask_instances)

    def _mask_features(self, features: List[Tensor]) -> List[Tensor]:
        by_name = dict(zip(self.head_in_features, features))
        return [by_name[f] for f in self.mask_in_features]

    def forward_inference(
        self, images: ImageList, features: List[Tensor], predictions: List[List[Tensor]]
    ):
        """
        RetinaNet's detections (up to ``TEST.DETECTIONS_PER_IMAGE`` per image, sorted by score,
        none of zero area inside the image), so that box AP is that of box-only inference, as
        the paper reports it. With a
        mask head, each also has ``pred_masks``, (R, 1, M, M) probabilities: the mask head runs
        on the top ``num_masks_test`` only (Sec. 3.5: "we use the top 50 bounding box
        predictions as mask proposals"), and the others get all-zero masks, which
        :func:`retinamask_d2.evaluation.build_coco_evaluator` leaves out of mask AP.
        """
        results = super().forward_inference(images, features, predictions)
        if not self.mask_on:
            return results
        if self.num_masks_test <= 0:
            x = self.mask_pooler(self._mask_features(features), [r.pred_boxes for r in results])
            return self.mask_head(x, results)
        top = [r[: self.num_masks_test] for r in results]
        x = self.mask_pooler(self._mask_features(features), [r.pred_boxes for r in top])
        top = self.mask_head(x, top)
        for r, t in zip(results, top):
            # Zeros as long as a slice, not a counted length: a traced graph stays dynamic.
            rest = r.scores[self.num_masks_test :]
            zeros = torch.zeros_like(rest)[:, None, None, None].expand(-1, *t.pred_masks.shape[1:])
            r.pred_masks = torch.cat([t.pred_masks, zeros.to(t.pred_masks.dtype)])
        return results


# Eq. 3 sends a 224-pixel box to P4 and every box over 448 pixels to P5, the coarsest level the
# paper pools masks from (Sec. 3.3; Table 3 tries P2-P5, never above P5).
_COARSEST_MASK_LEVEL = 5
_MASK_IN_FEATURES_EXAMPLE = '["p3", "p4", "p5"]'


def _check_mask_in_features(
    mask_in_features: List[str], head_in_features: List[str], input_shape: Dict[str, ShapeSpec]
):
    """
    Raise :class:`InputError` unless ``mask_in_features`` are consecutive FPN levels, fine to
    coarse, among the detector's ``head_in_features``, no coarser than P5, with equal channels:
    what the mask head's Eq. 3 level assignment (one level per box, clamped to the pooled
    range) needs.
    """
    key = "MODEL.RETINAMASK.MASK_IN_FEATURES"
    fix = (
        "Set it to consecutive levels up to P5 of MODEL.RETINANET.IN_FEATURES, e.g. "
        f"{_MASK_IN_FEATURES_EXAMPLE} as in the paper, or set MODEL.MASK_ON False."
    )
    if len(mask_in_features) == 0:
        raise InputError(f"{key} is empty, but the mask head needs levels to pool from. {fix}")
    unknown = [f for f in mask_in_features if f not in head_in_features]
    if unknown:
        raise InputError(
            f"{key} has {unknown}, which the detector does not compute (MODEL.RETINANET."
            f"IN_FEATURES is {list(head_in_features)}); the mask head pools from the "
            f"detector's own feature levels. {fix}"
        )
    levels = [math.log2(input_shape[f].stride) for f in mask_in_features]
    if any(b - a != 1 for a, b in zip(levels, levels[1:])) or any(
        not level.is_integer() for level in levels
    ):
        raise InputError(
            f"{key} = {list(mask_in_features)} are not consecutive FPN levels from fine to "
            f"coarse (strides {[input_shape[f].stride for f in mask_in_features]}); Eq. 3 "
            f"assigns each box one level of a contiguous range. {fix}"
        )
    too_coarse = [f for f, level in zip(mask_in_features, levels) if level > _COARSEST_MASK_LEVEL]
    if too_coarse:
        raise InputError(
            f"{key} has {too_coarse}, coarser than P5: Eq. 3 (k = 4 + log2(sqrt(wh) / 224)) "
            f"already gives P5 to every box over 448 pixels, so a coarser level would only get "
            f"boxes over 896 pixels, and the paper pools masks from P3-P5. {fix}"
        )
    channels = {f: input_shape[f].channels for f in mask_in_features}
    if len(set(channels.values())) > 1:
        raise InputError(
            f"{key} has levels of different widths {channels}, but one mask head reads them "
            f"all. {fix}"
        )
