import copy

import cv2
import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.modeling import RetinaNet, build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from conftest import load_config
from retinamask_d2 import InputError, RetinaMask, SelfAdjustingSmoothL1Loss

H, W = 128, 160


def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _instances(boxes, classes, with_masks=True):
    inst = Instances((H, W))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if with_masks and len(boxes):
        inst.gt_masks = PolygonMasks([_rect(*b) for b in boxes])
    return inst


def _batch(*instances, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(3, H, W, generator=g) * 255, "instances": inst} for inst in instances
    ]


def _train_step(model, batch):
    model.train()
    with EventStorage():
        return model(batch)


SHIPPED_MODELS = [
    "retinamask_R50.yaml",
    "retinamask_R50_1x.yaml",
    "retinamask_R101.yaml",
    "retinamask_R101_GN.yaml",
    "retinamask_X101_32x8d_GN.yaml",
    "retinanet_R50_1x.yaml",
]


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_config_trains_one_step(name):
    cfg = load_config(name, "MODEL.RETINANET.NUM_CLASSES", 3)
    model = build_model(cfg)
    batch = _batch(_instances([[10, 10, 60, 50], [70, 20, 150, 30]], [0, 2]))
    losses = _train_step(model, batch)
    expected = {"loss_cls", "loss_box_reg"}
    if cfg.MODEL.META_ARCHITECTURE == "RetinaMask":
        assert isinstance(model, RetinaMask) and model.mask_on
        expected.add("loss_mask")
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert has_grad(model.backbone.bottom_up)
    assert has_grad(model.head.bbox_subnet) and has_grad(model.head.cls_subnet)
    if "loss_mask" in expected:
        assert has_grad(model.mask_head)


class _RecordTargets(torch.nn.Module):
    """Wraps a box regression loss and keeps the targets and foreground mask it was given."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, pred_deltas, gt_deltas, fg_mask):
        self.gt_deltas, self.fg_mask = gt_deltas, fg_mask
        return self.loss(pred_deltas, gt_deltas, fg_mask)


def test_box_deltas_are_in_the_reference_units(small_cfg):
    # The reference code's box coder: (10 dx, 10 dy, 5 dw, 5 dh).
    assert small_cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS == (10.0, 10.0, 5.0, 5.0)
    batch = _batch(_instances([[10, 10, 60, 50], [70, 20, 150, 30]], [0, 2]))
    targets = {}
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        small_cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS = weights
        model = build_model(small_cfg)
        assert model.box2box_transform.weights == weights  # decoding at inference too
        model.box_reg_loss = _RecordTargets(model.box_reg_loss)
        _train_step(model, batch)
        fg = model.box_reg_loss.fg_mask
        assert fg.any()
        targets[weights] = model.box_reg_loss.gt_deltas[fg]
    torch.testing.assert_close(
        targets[(10.0, 10.0, 5.0, 5.0)],
        targets[(1.0, 1.0, 1.0, 1.0)] * torch.tensor([10.0, 10.0, 5.0, 5.0]),
    )


def test_box_reg_loss_weight_scales_only_the_box_loss(small_cfg):
    assert small_cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT == 0.25
    batch = _batch(_instances([[10, 10, 60, 50], [70, 20, 150, 30]], [0, 2]))
    model = build_model(small_cfg)
    state = copy.deepcopy(model.state_dict())
    weighted = _train_step(model, batch)

    small_cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT = 1.0
    unweighted_model = build_model(small_cfg)
    unweighted_model.load_state_dict(state)
    unweighted = _train_step(unweighted_model, batch)
    assert set(weighted) == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert unweighted["loss_box_reg"] > 0
    torch.testing.assert_close(weighted["loss_box_reg"], 0.25 * unweighted["loss_box_reg"])
    for name in ("loss_cls", "loss_mask"):
        torch.testing.assert_close(weighted[name], unweighted[name])


def test_loss_cls_normalizer_adds_the_images_as_the_reference(small_cfg):
    assert small_cfg.MODEL.RETINAMASK.LOSS_CLS_NORMALIZER == "positives+images"
    batch = _batch(_instances([[10, 10, 60, 50]], [0]), _instances([[70, 20, 150, 30]], [2]))
    model = build_model(small_cfg)
    state = copy.deepcopy(model.state_dict())
    with_images = _train_step(model, batch)
    normalizer = model.loss_normalizer.item()  # the EMA of #positives this step divided by

    small_cfg.MODEL.RETINAMASK.LOSS_CLS_NORMALIZER = "positives"
    plain_model = build_model(small_cfg)
    plain_model.load_state_dict(state)
    plain = _train_step(plain_model, batch)
    torch.testing.assert_close(
        with_images["loss_cls"], plain["loss_cls"] * normalizer / (normalizer + 2)
    )
    for name in ("loss_box_reg", "loss_mask"):
        torch.testing.assert_close(with_images[name], plain[name])

    small_cfg.MODEL.RETINAMASK.LOSS_CLS_NORMALIZER = "images"
    with pytest.raises(InputError, match="LOSS_CLS_NORMALIZER is 'images'; set it to"):
        build_model(small_cfg)


def test_mask_loss_trains_the_shared_features(small_cfg):
    model = build_model(small_cfg)
    losses = _train_step(model, _batch(_instances([[10, 10, 60, 50]], [1])))
    losses["loss_mask"].backward()
    # Sec. 3.3: the mask head pools from P3-P5, so its loss reaches the FPN and the backbone,
    # but not the detection head.
    assert model.backbone.fpn_output3.weight.grad.abs().sum() > 0
    assert any(p.grad is not None for p in model.backbone.bottom_up.res5.parameters())
    assert all(p.grad is None for p in model.head.parameters())


@pytest.mark.parametrize(
    "instances",
    [
        pytest.param(lambda: [_instances([], []), _instances([], [])], id="no-objects"),
        pytest.param(
            lambda: [_instances([], []), _instances([[10, 10, 60, 50]], [0])],
            id="one-image-without-objects",
        ),
        pytest.param(
            lambda: [_instances([[30, 30, 30, 80], [10, 10, 60, 50]], [1, 0])], id="zero-area"
        ),
        pytest.param(lambda: [_instances([[5, 60, 155, 67.5]], [2])], id="aspect-1:20"),
        pytest.param(
            lambda: [_instances([[0, 0, W, H], [2, 2, 4, 4]], [0, 1])], id="huge-and-tiny"
        ),
    ],
)
def test_degenerate_inputs_give_finite_losses(small_cfg, instances):
    model = build_model(small_cfg)
    losses = _train_step(model, _batch(*instances()))
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total = sum(losses.values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_no_detection_survives_the_score_threshold(small_cfg):
    small_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 1.0
    model = build_model(small_cfg)
    batch = _batch(_instances([[10, 10, 60, 50]], [1]), _instances([], []))
    proposals = model._detect_mask_proposals(*_dense_outputs(model, batch), [(H, W), (H, W)])
    assert [len(p) for p in proposals] == [0, 0]
    losses = _train_step(model, batch)
    assert all(torch.isfinite(v) for v in losses.values()), losses


def _dense_outputs(model, batch):
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    logits, deltas = model._transpose_dense_predictions(
        model.head(features), [model.num_classes, 4]
    )
    return model.anchor_generator(features), logits, deltas


def test_mask_proposals_are_the_top_detections(small_cfg):
    small_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    small_cfg.MODEL.RETINAMASK.NUM_MASK_PROPOSALS_TRAIN = 7
    model = build_model(small_cfg)
    batch = _batch(_instances([[10, 10, 60, 50]], [1]))
    anchors, logits, deltas = _dense_outputs(model, batch)
    proposals = model._detect_mask_proposals(anchors, logits, deltas, [(H, W)])
    assert len(proposals[0]) == 7
    assert not proposals[0].scores.requires_grad
    # The same detections as inference, truncated.
    model.eval()
    detections = model.inference_single_image(
        anchors, [x[0].sigmoid() for x in logits], [x[0] for x in deltas], (H, W)
    )
    torch.testing.assert_close(proposals[0].pred_boxes.tensor, detections.pred_boxes.tensor[:7])


def _inference(model, image):
    model.eval()
    with torch.no_grad():
        return model([{"image": image, "height": 2 * H, "width": 2 * W}])[0]["instances"]


def test_inference_returns_box_only_detections_with_masks_for_the_top_50(small_cfg):
    small_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # an untrained model scores ~0.01
    torch.manual_seed(0)
    model = build_model(small_cfg)
    # Random mask logits are ~0 and some draws paste empty masks; a positive bias makes every
    # mask cover its box, as a trained model's does over an object.
    torch.nn.init.constant_(model.mask_head.predictor.bias, 5.0)
    image = torch.rand(3, H, W) * 255
    out = _inference(model, image)
    # Sec. 3.5: box AP counts the top 100 detections, masks are predicted for the top 50.
    assert len(out) == 100
    assert out.pred_masks.shape == (100, 2 * H, 2 * W)
    assert out.pred_masks.dtype == torch.bool
    assert torch.all(out.scores[:-1] >= out.scores[1:])
    assert out.pred_masks[:50].flatten(1).any(dim=1).all()
    assert not out.pred_masks[50:].any()

    small_cfg.MODEL.MASK_ON = False
    box_only = build_model(small_cfg)
    box_only.load_state_dict(model.state_dict(), strict=False)
    boxes = _inference(box_only, image)
    assert not boxes.has("pred_masks")
    assert torch.equal(out.pred_boxes.tensor, boxes.pred_boxes.tensor)
    assert torch.equal(out.scores, boxes.scores)
    assert torch.equal(out.pred_classes, boxes.pred_classes)


def test_mask_head_runs_on_the_top_detections_only(small_cfg):
    torch.manual_seed(0)  # a random model and image, fixed: some draws paste an empty mask
    small_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    small_cfg.MODEL.RETINAMASK.NUM_MASKS_TEST = 7
    model = build_model(small_cfg).eval()
    seen = []
    model.mask_head.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    batch = _batch(_instances([], []), _instances([], []))
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    with torch.no_grad():
        results = model.forward_inference(images, features, model.head(features))
    assert seen == [2 * 7]  # one call, 7 RoIs per image
    for r in results:
        assert len(r) == 100 and r.pred_masks.shape == (100, 1, 28, 28)
        assert (r.pred_masks[:7] > 0).all() and not r.pred_masks[7:].any()

    small_cfg.MODEL.RETINAMASK.NUM_MASKS_TEST = 0  # every detection gets a mask
    model_all = build_model(small_cfg)
    model_all.load_state_dict(model.state_dict())
    out = _inference(model_all, torch.rand(3, H, W) * 255)
    assert len(out) == 100 and out.pred_masks.flatten(1).any(dim=1).all()


def _real_image(path):
    """A picture with a few filled shapes, written to and read back from disk."""
    img = np.full((H, W, 3), 200, np.uint8)
    cv2.circle(img, (40, 40), 25, (20, 120, 220), -1)
    cv2.rectangle(img, (80, 60), (150, 110), (30, 200, 40), -1)
    cv2.line(img, (10, 100), (70, 120), (0, 0, 0), 3)
    cv2.imwrite(str(path), img)
    return read_image(str(path), format="BGR")


def test_box_only_equals_detectron2_retinanet(small_cfg, tmp_path):
    small_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    small_cfg.MODEL.RETINAMASK.CLIP_BEFORE_NMS = False  # detectron2 clips after NMS
    torch.manual_seed(0)
    retinamask = build_model(small_cfg)
    # A few training steps so that the loss statistics and weights are not at their defaults.
    batch = _batch(_instances([[10, 10, 60, 50], [70, 20, 150, 30]], [0, 2]))
    opt = torch.optim.SGD(retinamask.parameters(), lr=0.001)
    for _ in range(2):
        sum(_train_step(retinamask, batch).values()).backward()
        opt.step()
        opt.zero_grad()
    checkpointer = DetectionCheckpointer(retinamask, save_dir=str(tmp_path))
    checkpointer.save("model_final")
    weights = str(tmp_path / "model_final.pth")

    box_cfg = small_cfg.clone()
    box_cfg.MODEL.MASK_ON = False
    box_only = build_model(box_cfg)
    incompatible = DetectionCheckpointer(box_only)._load_model(torch.load(weights))
    assert incompatible.missing_keys == []
    assert {k.split(".")[0] for k in incompatible.unexpected_keys} == {"mask_head"}

    stock_cfg = box_cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    stock = build_model(stock_cfg)
    assert type(stock) is RetinaNet
    incompatible = DetectionCheckpointer(stock)._load_model(torch.load(weights))
    assert incompatible.missing_keys == []
    assert {k.split(".")[0] for k in incompatible.unexpected_keys} == {
        "mask_head",
        "box_reg_loss",
        "loss_normalizer",
    }

    image = torch.as_tensor(_real_image(tmp_path / "shapes.png").transpose(2, 0, 1).copy())
    a, b = _inference(box_only, image.float()), _inference(stock, image.float())
    # None of RetinaNet's top 100 is empty (detector_postprocess would have dropped it).
    assert len(a) == len(b) == 100
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)


@pytest.mark.parametrize("points", [True, False], ids=["no-overlap", "overlapping"])
def test_box_only_returns_retinanets_detections_then_those_retinanet_lost_to_empty_boxes(
    small_cfg, points
):
    # Boxes of zero area inside the image are dropped before each level's top-k and NMS by
    # RetinaMask, after NMS and the top 100 by RetinaNet (detector_postprocess). Every box is
    # moved one anchor width right (dx 10 in units (10, 10, 5, 5)), which takes the boxes of
    # anchors near the right edge out of the image, and top-k is above the number of anchors.
    small_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    small_cfg.MODEL.RETINANET.TOPK_CANDIDATES_TEST = 100000
    small_cfg.MODEL.MASK_ON = False
    torch.manual_seed(0)
    box_only = build_model(small_cfg)
    with torch.no_grad():
        box_only.head.bbox_pred.bias.view(-1, 4)[:, 0] = 10.0
        # Shrunk to 1/150 of their anchor, no two boxes overlap: no empty box suppresses
        # another in NMS. At full size, empty boxes suppress boxes that are inside the image.
        box_only.head.bbox_pred.bias.view(-1, 4)[:, 2:] = -25.0 if points else 0.0
    stock_cfg = small_cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    stock = build_model(stock_cfg)
    stock.load_state_dict(box_only.state_dict(), strict=False)
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0)) * 255
    a, b = _inference(box_only, image), _inference(stock, image)
    assert len(a) == 100 and 0 < len(b) < 100  # some of RetinaNet's top 100 were empty

    ours, theirs = _detections(a), _detections(b)
    if points:
        # RetinaNet's detections are RetinaMask's first ones; the extras rank below them.
        assert ours[: len(theirs)] == theirs
    else:
        # RetinaMask keeps boxes that RetinaNet suppressed with an empty box, and those can
        # suppress some of RetinaNet's detections in turn.
        assert set(theirs) - set(ours)


def _detections(instances):
    """(box, score, class) of each detection, in order."""
    boxes = map(tuple, instances.pred_boxes.tensor.tolist())
    return list(zip(boxes, instances.scores.tolist(), instances.pred_classes.tolist()))


def test_loss_statistics_are_in_the_checkpoint(small_cfg):
    model = build_model(small_cfg)
    assert isinstance(model.box_reg_loss, SelfAdjustingSmoothL1Loss)
    _train_step(model, _batch(_instances([[10, 10, 60, 50]], [1])))
    state = model.state_dict()
    assert not torch.equal(state["box_reg_loss.running_mean"], torch.full((4,), 0.11))
    restored = build_model(small_cfg)
    restored.load_state_dict(copy.deepcopy(state))
    assert torch.equal(restored.box_reg_loss.beta, model.box_reg_loss.beta)
    assert torch.equal(restored.loss_normalizer, model.loss_normalizer)


def test_default_predictor_with_a_saved_checkpoint(small_cfg, tmp_path):
    model = build_model(small_cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    small_cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    small_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    predictor = DefaultPredictor(small_cfg)
    image = _real_image(tmp_path / "shapes.png")
    out = predictor(image)["instances"]
    assert isinstance(out, Instances)
    assert out.image_size == (H, W)
    assert 0 < len(out) <= 100
    assert out.pred_masks.shape[1:] == (H, W)
    for p_loaded, p_saved in zip(
        predictor.model.state_dict().values(), model.state_dict().values()
    ):
        assert torch.equal(p_loaded, p_saved)


def test_mask_on_without_mask_annotations_is_a_clear_error(small_cfg):
    model = build_model(small_cfg)
    with pytest.raises(ValueError, match="MODEL.MASK_ON False"):
        _train_step(model, _batch(_instances([[10, 10, 60, 50]], [1], with_masks=False)))


def test_box_only_costs_exactly_what_retinanet_costs(small_cfg):
    from detectron2.utils.analysis import FlopCountAnalysis

    small_cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    small_cfg.MODEL.MASK_ON = False
    box_only = build_model(small_cfg).eval()
    stock_cfg = small_cfg.clone()
    stock_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    stock = build_model(stock_cfg).eval()
    inputs = [{"image": torch.rand(3, H, W) * 255}]
    flops = []
    for model in (box_only, stock):
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, inputs)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            flops.append(analysis.by_operator())
    assert sum(flops[0].values()) > 0
    assert flops[0] == flops[1]
    params = [sum(p.numel() for p in m.parameters()) for m in (box_only, stock)]
    assert params[0] == params[1]


def test_num_pos_anchors_is_logged_as_retinanet_logs_it(small_cfg):
    model = build_model(small_cfg).train()
    batch = _batch(_instances([[10, 10, 60, 50], [70, 20, 150, 30]], [0, 2]), _instances([], []))
    anchors, _, _ = _dense_outputs(model, batch)
    gt_labels, _ = model.label_anchors(anchors, [x["instances"] for x in batch])
    gt_labels = torch.stack(gt_labels)
    expected = ((gt_labels >= 0) & (gt_labels != model.num_classes)).sum().item() / 2
    with EventStorage() as storage:
        for _ in range(2):  # a step's count reaches the storage during the next step
            model(batch)
            storage.step()
        values = storage.history("num_pos_anchors").values()
    assert expected > 0
    assert values == [(expected, 0)]


@pytest.mark.parametrize(
    "features, message",
    [
        ([], "MASK_IN_FEATURES is empty"),
        (["p2"], r"MASK_IN_FEATURES has \['p2'\], which the detector does not compute"),
        (["p5", "p6"], r"MASK_IN_FEATURES has \['p6'\], coarser than P5: Eq. 3"),
        (["p3", "p5"], "are not consecutive FPN levels from fine to coarse"),
        (["p4", "p3"], "are not consecutive FPN levels from fine to coarse"),
    ],
)
def test_mask_in_features_outside_the_rule_is_a_one_line_input_error(small_cfg, features, message):
    small_cfg.MODEL.RETINAMASK.MASK_IN_FEATURES = features
    with pytest.raises(InputError, match=message) as e:
        build_model(small_cfg)
    assert "\n" not in str(e.value) and 'e.g. ["p3", "p4", "p5"]' in str(e.value)


def test_mask_in_features_may_be_fewer_levels_up_to_p5(small_cfg):
    small_cfg.MODEL.RETINAMASK.MASK_IN_FEATURES = ["p4", "p5"]
    model = build_model(small_cfg)
    losses = _train_step(model, _batch(_instances([[10, 10, 60, 50]], [1])))
    assert torch.isfinite(losses["loss_mask"])


def _confident(model):
    # Random weights score ~0.01 (the prior); a large bias makes every anchor a detection.
    torch.nn.init.constant_(model.head.cls_score.bias, 3.0)
    return model


def test_default_predictor_on_a_1x1_image_returns_no_zero_area_box(small_cfg):
    predictor = DefaultPredictor(small_cfg)
    _confident(predictor.model)
    out = predictor(np.full((1, 1, 3), 128, np.uint8))["instances"]
    assert out.image_size == (1, 1)
    assert len(out) > 0
    assert (out.pred_boxes.area() > 0).all()


def _nonempty_in_image(instances):
    boxes = instances.pred_boxes.clone()
    boxes.clip(instances.image_size)
    return boxes.nonempty()


@pytest.mark.parametrize("clip_before_nms", [False, True])
def test_detections_and_mask_proposals_have_area_inside_the_image(small_cfg, clip_before_nms):
    # A 1-pixel-high input: most anchors decode to boxes entirely above or below the image.
    small_cfg.MODEL.RETINAMASK.CLIP_BEFORE_NMS = clip_before_nms
    model = _confident(build_model(small_cfg))
    batch = [{"image": torch.rand(1, 1, W) * 255, "instances": _instances([], [])}]
    batch[0]["instances"]._image_size = (1, W)
    anchors, logits, deltas = _dense_outputs(model, batch)
    proposals = model._detect_mask_proposals(anchors, logits, deltas, [(1, W)])[0]
    # Clipped before NMS, the boxes are 1 pixel high and overlap: NMS keeps fewer.
    assert clip_before_nms or len(proposals) == model.num_mask_proposals_train
    assert len(proposals) > 0 and _nonempty_in_image(proposals).all()

    model.eval()
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    with torch.no_grad():
        detections = model.forward_inference(images, features, model.head(features))[0]
    # Unclipped, the top-k is filled with boxes that have an area.
    assert len(detections) == 100 or clip_before_nms and len(detections) > 0
    assert _nonempty_in_image(detections).all()
