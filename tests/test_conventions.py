import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from conftest import load_config
from retinamask_d2 import InputError, Predictor, build_test_resize
from retinamask_d2.conventions import ReferencePastedMasks, ReferenceResizeShortestEdge

ORIGINAL = "original/retinamask_R50.yaml"
SYNTHETIC = "synthetic/retinamask_synthetic.yaml"


@pytest.mark.parametrize(
    "size, expected",
    [
        # 451 * 800 / 300 = 1202.67: floored, where detectron2 rounds to 1203.
        ((300, 451), (800, 1202)),
        ((451, 300), (1202, 800)),
        # 384 * 800 / 303 = 1013.86.
        ((303, 384), (800, 1013)),
        # Wide: 1100 / 300 * 800 > 1333, so the short side is round(1333 * 300 / 1100) = 364
        # and the long side int(364 * 1100 / 300) = 1334, one pixel over the maximum.
        ((300, 1100), (364, 1334)),
        # 1333 * 400 / 1200 = 444.33 -> 444; 444 * 1200 / 400 = 1332.
        ((400, 1200), (444, 1332)),
        # The short side already has the size: left as it is.
        ((800, 1000), (800, 1000)),
    ],
)
def test_reference_resize_floors_the_long_side_and_rounds_under_the_max_size_rule(size, expected):
    assert ReferenceResizeShortestEdge.get_output_shape(*size, 800, 1333) == expected
    transform = ReferenceResizeShortestEdge(800, 1333).get_transform(np.zeros((*size, 3), "uint8"))
    assert (transform.new_h, transform.new_w) == expected


def test_config_chooses_the_test_resize_for_loader_demo_and_predictor():
    image = np.zeros((300, 451, 3), "uint8")
    original = load_config(ORIGINAL)
    ours = load_config(ORIGINAL, "MODEL.RETINAMASK.TEST_RESIZE", "detectron2")
    assert build_test_resize(original).get_transform(image).new_w == 1202
    assert build_test_resize(ours).get_transform(image).new_w == 1203
    assert isinstance(Predictor(original).aug, ReferenceResizeShortestEdge)
    assert isinstance(build_test_resize(load_config("retinamask_R50.yaml")), T.ResizeShortestEdge)
    with pytest.raises(InputError, match="TEST_RESIZE"):
        build_test_resize(load_config(ORIGINAL, "MODEL.RETINAMASK.TEST_RESIZE", "floor"))


def _pasted(box, input_size, output_size, mask_size=28):
    instances = Instances(input_size, pred_boxes=Boxes(torch.tensor([box])))
    instances.pred_masks = ReferencePastedMasks(torch.ones(1, mask_size, mask_size), input_size)
    return detector_postprocess(instances, *output_size).pred_masks[0]


def test_reference_paste_of_a_hand_made_mask_and_box():
    # The inclusive box (14.17, 14.17, 41.23, 41.23), its 28x28 mask padded to 30x30, becomes the
    # box (13.2, 13.2, 42.2, 42.2) (half width 13.53 * 30 / 28 = 14.5), truncated to pixels 13 to
    # 42: 30 samples for 30 cells, so the padded mask is pasted as it is, its border of zeros on
    # pixels 13 and 42 and its ones on 14 to 41.
    x1, x2 = 27.7 - 14.5 * 28 / 30, 27.7 + 14.5 * 28 / 30 + 1
    mask = _pasted([x1, x1, x2, x2], (64, 64), (64, 64))
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[14:42, 14:42] = True
    assert torch.equal(mask, expected)


def test_reference_paste_scales_the_inclusive_box_to_the_output_image():
    # Input box (10, 10, 20, 20), inclusive (10, 10, 19, 19), in a 32x32 input; the output is
    # twice as large: the reference pastes into (20, 20, 38, 38), detectron2's box would be
    # (20, 20, 40, 40). Padded and enlarged by 30/28: (19.36, 19.36, 38.64, 38.64) -> pixels
    # 19 to 38, whose outer ones hold the zero padding.
    mask = _pasted([10.0, 10.0, 20.0, 20.0], (32, 32), (64, 64))
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    assert (rows.min().item(), rows.max().item()) == (20, 37)


def _model_with_level_features(*opts):
    cfg = load_config(SYNTHETIC, "MODEL.RETINAMASK.INCLUSIVE_MASK_BOXES", True, *opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # P3 to P7 of a 512x512 input, each filled with its level's number.
    features = [torch.full((1, 64, 512 >> k, 512 >> k), float(k)) for k in range(3, 8)]
    return model, features


@pytest.mark.parametrize("side, level", [(224.0, 4), (223.9, 3), (448.0, 5), (447.9, 4)])
def test_inclusive_mask_boxes_take_the_level_of_the_full_box(side, level):
    # The reference's LevelMapper: sqrt((x2 - 1 - x1 + 1) * (y2 - 1 - y1 + 1)) = side, level
    # floor(4 + log2(side / 224)). Pooling the shrunk box itself would put 224 on level 3.
    model, features = _model_with_level_features()
    pooled = model._pool_mask_features(
        features, [Boxes(torch.tensor([[10.0, 10.0, 10 + side, 10 + side]]))]
    )
    torch.testing.assert_close(pooled, torch.full_like(pooled, float(level)))


def test_inclusive_mask_boxes_pool_the_inclusive_box_without_alignment():
    model, _ = _model_with_level_features(
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
        "ROIAlign",
        "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO",
        2,
    )
    torch.manual_seed(1)
    features = [torch.randn(1, 64, 512 >> k, 512 >> k) for k in range(3, 8)]
    box = torch.tensor([[30.0, 40.0, 130.0, 90.0]])  # sqrt(area) 70.7: level 3, stride 8
    pooled = model._pool_mask_features(features, [Boxes(box)])
    rois = torch.tensor([[0.0, 30.0, 40.0, 129.0, 89.0]])
    expected = roi_align(features[0], rois, 14, 1 / 8, 2, aligned=False)
    torch.testing.assert_close(pooled, expected)


def test_inclusive_mask_boxes_need_roi_align():
    with pytest.raises(InputError, match="POOLER_TYPE"):
        build_model(
            load_config(
                SYNTHETIC,
                "MODEL.RETINAMASK.INCLUSIVE_MASK_BOXES", True,
                "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIPool",
            )
        )  # fmt: skip


@pytest.mark.parametrize("clip", [False, True])
def test_clip_before_nms_keeps_every_detection_inside_the_image(clip):
    # Untrained, the detections are about the anchors, many of which reach past a 96x128 image.
    cfg = load_config(
        SYNTHETIC,
        "MODEL.RETINAMASK.CLIP_BEFORE_NMS", clip,
        "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        "MODEL.MASK_ON", False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = model.preprocess_image([{"image": torch.rand(3, 96, 128) * 255}])
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    with torch.no_grad():
        boxes = model.forward_inference(images, features, model.head(features))[0].pred_boxes
    inside = boxes.tensor.clamp(min=0).minimum(torch.tensor([128.0, 96.0, 128.0, 96.0]))
    assert torch.equal(boxes.tensor, inside) == clip


def test_reference_paste_of_a_box_under_one_pixel_is_empty():
    # Inclusive x2 = 10.5 - 1 < x1: the reference's paste gives no pixel, and no error.
    mask = _pasted([10.0, 10.0, 10.5, 20.0], (32, 32), (32, 32))
    assert mask.shape == (32, 32) and not mask.any()


@pytest.mark.parametrize("clip", [False, True])
def test_box_outside_the_image_is_kept_at_its_border_only_with_clip_before_nms(clip):
    # The reference clamps its inclusive boxes to the image and keeps them all: a box right of
    # a 96x128 image becomes the last pixel column, inclusive x1 = x2 = 127.
    cfg = load_config(SYNTHETIC, "MODEL.RETINAMASK.CLIP_BEFORE_NMS", clip, "MODEL.MASK_ON", False)
    model = build_model(cfg).eval()
    anchors = Boxes(torch.tensor([[130.0, -10.0, 150.0, 20.0], [10.0, 10.0, 30.0, 40.0]]))
    scores = torch.tensor([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0]])
    pred = model._decode_per_level_predictions(
        anchors, scores, torch.zeros(2, 4), 0.05, 1000, (96, 128)
    )
    inside = [[10.0, 10.0, 30.0, 40.0]]
    expected = [[127.0, 0.0, 128.0, 20.0]] + inside if clip else inside
    assert pred.pred_boxes.tensor.tolist() == expected
