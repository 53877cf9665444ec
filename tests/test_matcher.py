import pytest
import torch

from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, pairwise_iou

from retinamask_d2 import BestMatchMatcher, InputError, build_anchor_matcher, get_retinamask_cfg

RETINANET_THRESHOLDS = ([0.4, 0.5], [0, -1, 1])


def _retinanet_anchors(image_size=256):
    """The anchors of RetinaNet's default config (P3-P7, 3 scales x 3 aspect ratios)."""
    strides = [8, 16, 32, 64, 128]
    generator = DefaultAnchorGenerator(
        sizes=[[s * 2 ** (i / 3) for i in range(3)] for s in [32, 64, 128, 256, 512]],
        aspect_ratios=[[0.5, 1.0, 2.0]],
        strides=strides,
    )
    features = [torch.zeros(1, 1, image_size // s, image_size // s) for s in strides]
    return Boxes.cat(generator(features))


def _match(threshold, gt_boxes, anchors):
    matcher = BestMatchMatcher(*RETINANET_THRESHOLDS, best_match_threshold=threshold)
    return matcher(pairwise_iou(Boxes(gt_boxes), anchors))


def test_thin_object_gets_a_positive_only_with_best_matching():
    anchors = _retinanet_anchors()
    thin = torch.tensor([[60.0, 120.0, 160.0, 130.0]])  # 100 x 10, aspect ratio 1:10
    iou = pairwise_iou(Boxes(thin), anchors)
    assert 0 < iou.max() < 0.5  # no anchor covers it at the RetinaNet threshold

    _, labels = _match(0.0, thin, anchors)
    assert (labels == 1).sum() >= 1
    assert torch.all(iou[0, labels == 1] == iou.max())

    _, labels = _match(0.5, thin, anchors)
    assert (labels == 1).sum() == 0


def test_box_without_overlap_adds_nothing():
    anchors = _retinanet_anchors()
    plain = Matcher(*RETINANET_THRESHOLDS, allow_low_quality_matches=False)
    for degenerate in ([[50.0, 50.0, 50.0, 90.0]], [[1000.0, 1000.0, 1100.0, 1100.0]]):
        gt = torch.tensor([[100.0, 100.0, 180.0, 170.0]] + degenerate)
        iou = pairwise_iou(Boxes(gt), anchors)
        assert iou[1].max() == 0
        matches, labels = _match(0.0, gt, anchors)
        # Only the normal box contributes positives; nothing becomes positive for the other.
        assert torch.all(matches[labels == 1] == 0)
        assert (labels == 1).sum() < len(anchors) // 100
        expected_matches, expected_labels = plain(iou)
        assert (labels == 1).sum() >= (expected_labels == 1).sum()


def test_ties_all_become_positive():
    anchors = Boxes(
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [40, 0, 50, 10]])
    )
    gt = torch.tensor([[5.0, 0.0, 15.0, 10.0]])  # IoU 1/3 with each of the first two anchors
    matches, labels = _match(0.0, gt, anchors)
    assert labels.tolist() == [1, 1, 0]
    assert matches[:2].tolist() == [0, 0]


def test_anchor_positive_for_another_object_is_not_taken():
    # Anchor 0 is positive for ground truth 0 (IoU 0.6) and the best anchor of ground truth 1.
    iou = torch.tensor([[0.6, 0.1], [0.3, 0.2]])
    matcher = BestMatchMatcher(*RETINANET_THRESHOLDS, best_match_threshold=0.0)
    matches, labels = matcher(iou)
    assert labels.tolist() == [1, 0]
    assert matches[0].item() == 0


@pytest.mark.parametrize("promoted_match, expected", [("best_matched", 0), ("max_iou", 1)])
def test_promoted_anchor_is_matched_as_the_key_says(promoted_match, expected):
    # Anchor 0 overlaps ground truth 1 most (0.37), but it is the best anchor of ground truth 0
    # only; ground truth 1's best anchor is anchor 1 (0.45).
    iou = torch.tensor([[0.35, 0.0], [0.37, 0.45]])
    matcher = BestMatchMatcher(
        *RETINANET_THRESHOLDS, best_match_threshold=0.0, promoted_match=promoted_match
    )
    matches, labels = matcher(iou)
    assert labels.tolist() == [1, 1]
    assert matches.tolist() == [expected, 1]


def test_small_object_inside_a_large_one():
    anchors = _retinanet_anchors()
    large, small = [96.0, 96.0, 152.0, 152.0], [116.0, 116.0, 132.0, 132.0]  # 56 and 16 wide
    iou = pairwise_iou(Boxes(torch.tensor([large, small])), anchors)
    small_best = iou[1] == iou[1].max()
    # Each best anchor of the small object overlaps the large one more, and is below 0.5.
    assert small_best.sum() >= 1 and torch.all(iou[0, small_best] > iou[1, small_best])
    assert iou[:, small_best].max() < 0.5

    matcher = BestMatchMatcher(*RETINANET_THRESHOLDS, promoted_match="best_matched")
    matches, labels = matcher(iou)
    assert torch.all(labels[small_best] == 1) and torch.all(matches[small_best] == 1)

    # The reference's rule: they go to the large object, and the small one has no positive.
    matcher = BestMatchMatcher(*RETINANET_THRESHOLDS, promoted_match="max_iou")
    matches, labels = matcher(iou)
    assert torch.all(labels[small_best] == 1) and torch.all(matches[small_best] == 0)
    assert not torch.any((labels == 1) & (matches == 1))


def test_threshold_is_strict_and_only_adds_positives():
    iou = torch.tensor([[0.3, 0.2, 0.45, 0.0]])
    matcher = BestMatchMatcher(*RETINANET_THRESHOLDS, best_match_threshold=0.45)
    assert matcher(iou)[1].tolist() == [0, 0, -1, 0]
    matcher = BestMatchMatcher(*RETINANET_THRESHOLDS, best_match_threshold=0.44)
    assert matcher(iou)[1].tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("threshold", [0.5, 0.7, 1.0])
def test_equals_detectron2_matcher_at_or_above_positive_threshold(threshold):
    torch.manual_seed(0)
    anchors = _retinanet_anchors()
    xy = torch.rand(12, 2) * 200
    gt = torch.cat([xy, xy + 4 + torch.rand(12, 2) * 120], dim=1)
    iou = pairwise_iou(Boxes(gt), anchors)
    plain = Matcher(*RETINANET_THRESHOLDS, allow_low_quality_matches=False)
    matcher = BestMatchMatcher(*RETINANET_THRESHOLDS, best_match_threshold=threshold)
    expected_matches, expected_labels = plain(iou)
    matches, labels = matcher(iou)
    assert torch.equal(labels, expected_labels)
    assert torch.equal(matches, expected_matches)


def test_no_ground_truth():
    matcher = BestMatchMatcher(*RETINANET_THRESHOLDS, best_match_threshold=0.0)
    matches, labels = matcher(torch.zeros(0, 7))
    assert labels.tolist() == [0] * 7
    assert matches.shape == (7,)


def test_built_from_config():
    cfg = get_retinamask_cfg()
    cfg.MODEL.RETINANET.IOU_THRESHOLDS = [0.3, 0.6]
    cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD = 0.2
    matcher = build_anchor_matcher(cfg)
    assert isinstance(matcher, BestMatchMatcher)
    assert matcher.thresholds[1:-1] == [0.3, 0.6]
    assert matcher.best_match_threshold == 0.2
    assert matcher.promoted_match == "best_matched"
    cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.PROMOTED_MATCH = "max_iou"
    assert build_anchor_matcher(cfg).promoted_match == "max_iou"
    cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.PROMOTED_MATCH = "argmax"
    with pytest.raises(InputError, match="PROMOTED_MATCH is 'argmax'; set it to 'max_iou'"):
        build_anchor_matcher(cfg)
    cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.PROMOTED_MATCH = "max_iou"
    cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.NAME = "BestMatcher"
    registered = "NAME = 'BestMatcher' is not registered; registered names are: BestMatchMatcher"
    with pytest.raises(KeyError, match=registered):
        build_anchor_matcher(cfg)
