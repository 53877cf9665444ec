import torch

from detectron2.config import configurable
from detectron2.modeling.matcher import Matcher

from .build import ANCHOR_MATCHER_REGISTRY
from .config import InputError, check_choice

__all__ = ["BestMatchMatcher"]


@ANCHOR_MATCHER_REGISTRY.register()
class BestMatchMatcher(Matcher):
    """
    RetinaNet anchor matching plus the best-matching policy of RetinaMask (Sec. 3.1): after
    :class:`Matcher`'s IoU thresholds, the anchors with a ground truth's highest IoU (ties
    included) become positive for it if that IoU is strictly greater than
    ``best_match_threshold``. An anchor already positive keeps its object. A promoted anchor is
    matched to the ground truth it overlaps most (``promoted_match="max_iou"``, as the
    reference's and detectron2's low-quality matches), or to the one it overlaps most among
    those it is the best anchor of (``"best_matched"``: a small object inside a larger one
    keeps its best anchors).

    Unlike ``Matcher(allow_low_quality_matches=True)``, a ground truth that overlaps no anchor
    adds nothing (rather than every anchor with IoU 0).
    """

    @configurable
    def __init__(
        self, thresholds, labels, *, best_match_threshold=0.0, promoted_match="best_matched"
    ):
        """
        Args:
            thresholds, labels (list[float], list[int]): as in :class:`Matcher`, e.g.
                ``[0.4, 0.5]`` and ``[0, -1, 1]``.
            best_match_threshold (float): best-matching anchors of a ground truth become
                positive if their IoU is strictly greater than this. A value >= the positive
                IoU threshold makes this plain threshold matching.
            promoted_match (str): "max_iou" or "best_matched", the ground truth of a promoted
                anchor (see above).
        """
        super().__init__(thresholds, labels, allow_low_quality_matches=False)
        key = "MODEL.RETINAMASK.ANCHOR_MATCHER"
        if best_match_threshold < 0:
            raise InputError(
                f"{key}.BEST_MATCH_THRESHOLD is {best_match_threshold}; "
                "set it >= 0 (0.0, the paper's, makes any nonzero overlap a best match)."
            )
        check_choice(f"{key}.PROMOTED_MATCH", promoted_match)
        self.best_match_threshold = best_match_threshold
        self.promoted_match = promoted_match

    @classmethod
    def from_config(cls, cfg):
        matcher_cfg = cfg.MODEL.RETINAMASK.ANCHOR_MATCHER
        return {
            "thresholds": list(cfg.MODEL.RETINANET.IOU_THRESHOLDS),
            "labels": list(cfg.MODEL.RETINANET.IOU_LABELS),
            "best_match_threshold": matcher_cfg.BEST_MATCH_THRESHOLD,
            "promoted_match": matcher_cfg.PROMOTED_MATCH,
        }

    def __call__(self, match_quality_matrix: torch.Tensor):
        """
        Args:
            match_quality_matrix (Tensor): (M, N) IoU between M ground truths and N anchors.

        Returns:
            matches (Tensor[int64]): (N,), the ground truth index in [0, M) of each anchor.
            match_labels (Tensor[int8]): (N,), 1 positive, 0 negative, -1 ignored.
        """
        matches, match_labels = super().__call__(match_quality_matrix)
        if match_quality_matrix.numel() == 0:
            return matches, match_labels

        best_per_gt = match_quality_matrix.max(dim=1, keepdim=True).values  # (M, 1)
        # IoU >= 0, so a row of zeros never passes the strict comparison: no anchor is promoted
        # for a ground truth that overlaps nothing.
        is_best = (match_quality_matrix == best_per_gt) & (best_per_gt > self.best_match_threshold)
        promote = is_best.any(dim=0) & (match_labels != 1)
        # "max_iou": Matcher's matches already are each anchor's highest-IoU ground truth.
        if self.promoted_match == "best_matched":
            _, best_gt = torch.where(
                is_best, match_quality_matrix, match_quality_matrix.new_tensor(-1.0)
            ).max(dim=0)
            matches = torch.where(promote, best_gt, matches)
        match_labels = torch.where(promote, torch.ones_like(match_labels), match_labels)
        return matches, match_labels
