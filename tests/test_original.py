import os
import subprocess
import sys

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from retinamask_d2.original import (
    NEVER_SAVED,
    DetectronAnchorGenerator,
    OriginalCheckpointError,
    convert_original_file,
    load_original_checkpoint,
)

from conftest import REPO_ROOT, load_config
from original_layout import original_state_dict, trainer_checkpoint


@pytest.fixture(scope="module")
def r50():
    """The original R-50 config, its model, and a synthetic checkpoint in the reference's layout."""
    cfg = load_config("original/retinamask_R50.yaml")
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval(), original_state_dict(depth=50)


def _convert(cfg, state_dict, tmp_path, **kwargs):
    src, dst = tmp_path / "original.pth", tmp_path / "converted.pth"
    torch.save(trainer_checkpoint(state_dict, **kwargs), src)
    summary = convert_original_file(cfg, str(src), str(dst))
    return torch.load(dst, weights_only=True)["model"], summary


# The reference's cell anchors of P3, worked out by hand from its generate_anchors
# (maskrcnn_benchmark/modeling/rpn/anchor_generator.py) for stride 8, sizes 32 * 2^(i/3) =
# 32, 40.3175, 50.7968 and ratios 0.5, 1, 2 (configs/Base-RetinaMask.yaml). The base cell
# (0, 0, 7, 7) has area 64 and centre (3.5, 3.5). _ratio_enum rounds the shape of each ratio r
# (numpy: halves to even): w = round(sqrt(64 / r)), h = round(w * r), so r = 0.5 is
# round(11.31) = 11 by round(5.5) = 6, r = 1 is 8 by 8, r = 2 is round(5.66) = 6 by 12.
# _scale_enum multiplies both by size / 8 = s = 4, 5.0397, 6.3496. A row is
# (3.5 - (w - 1) / 2, 3.5 - (h - 1) / 2, 3.5 + (w - 1) / 2, 3.5 + (h - 1) / 2), with inclusive
# x2, y2; ratios outer, sizes inner.
P3_REFERENCE_ANCHORS = [
    # r = 0.5: w = 11 s, h = 6 s
    [-18.0, -8.0, 25.0, 15.0],  # s = 4: 44 x 24
    [-23.718263, -11.119053, 30.718263, 18.119053],  # 55.436526 x 30.238105
    [-30.922823, -15.048813, 37.922823, 22.048813],  # 69.845646 x 38.097625
    # r = 1: w = h = 8 s
    [-12.0, -12.0, 19.0, 19.0],  # 32 x 32
    [-16.158737, -16.158737, 23.158737, 23.158737],  # 40.317474 x 40.317474
    [-21.398417, -21.398417, 28.398417, 28.398417],  # 50.796834 x 50.796834
    # r = 2: w = 6 s, h = 12 s
    [-8.0, -20.0, 15.0, 27.0],  # 24 x 48
    [-11.119053, -26.238105, 18.119053, 33.238105],  # 30.238105 x 60.476210
    [-15.048813, -34.097625, 22.048813, 41.097625],  # 38.097625 x 76.195250
]
# detectron2's order (sizes outer, ratios inner) of the reference's rows.
PERM = [0, 3, 6, 1, 4, 7, 2, 5, 8]


def test_anchor_generator_has_reference_anchors(r50):
    cfg, model, _ = r50
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0] == [32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)]
    generator = model.anchor_generator
    assert isinstance(generator, DetectronAnchorGenerator)
    cell = next(iter(generator.cell_anchors))
    assert cell[0].tolist() == [-22.0, -12.0, 22.0, 12.0]
    # The anchors of cell (0, 0) are the reference's, reordered, with x2 and y2 plus one.
    first_cell = generator([torch.zeros(1, 1, 2, 2)])[0].tensor[:9]
    expected = torch.tensor(P3_REFERENCE_ANCHORS)[PERM] + torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(first_cell, expected, atol=1e-5, rtol=0)


def test_checkpoint_with_the_reference_anchors_converts(r50, tmp_path):
    cfg, _, original = r50
    table = torch.tensor(P3_REFERENCE_ANCHORS)
    # The synthetic checkpoints' anchors, level 0 here, follow the reference's formula.
    torch.testing.assert_close(original["rpn.anchor_generator.cell_anchors.0"], table)
    original = dict(original, **{"rpn.anchor_generator.cell_anchors.0": table})
    _, summary = _convert(cfg, original, tmp_path)
    assert "rpn.anchor_generator.cell_anchors.0" in summary["dropped"]


@pytest.mark.parametrize("row, column", [(3, 2), (7, 1)])
def test_checkpoint_with_an_anchor_one_pixel_off_is_refused(r50, tmp_path, row, column):
    cfg, _, original = r50
    table = torch.tensor(P3_REFERENCE_ANCHORS)
    table[row, column] += 1.0
    original = dict(original, **{"rpn.anchor_generator.cell_anchors.0": table})
    with pytest.raises(OriginalCheckpointError) as e:
        _convert(cfg, original, tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert "the checkpoint's anchors at level 0 (" in message
    assert "use MODEL.ANCHOR_GENERATOR.NAME DetectronAnchorGenerator with OFFSET 0.5" in message
    assert not (tmp_path / "converted.pth").exists()


def test_every_key_converted_and_loaded(r50, tmp_path):
    cfg, model, original = r50
    converted, summary = _convert(cfg, original, tmp_path)
    assert sorted(summary["not_in_checkpoint"]) == sorted(NEVER_SAVED)
    assert set(converted) == set(model.state_dict()) - set(NEVER_SAVED)
    assert "rpn.anchor_generator.cell_anchors.0" in summary["dropped"]

    checkpointer = DetectionCheckpointer(build_model(cfg))
    incompatible = checkpointer._load_model({"model": dict(converted)})
    assert incompatible.unexpected_keys == []
    assert sorted(incompatible.missing_keys) == sorted(NEVER_SAVED)
    assert incompatible.incorrect_shapes == []

    torch.testing.assert_close(
        converted["backbone.bottom_up.res3.1.conv2.weight"],
        original["backbone.body.layer2.1.conv2.weight"],
    )
    torch.testing.assert_close(
        converted["backbone.fpn_lateral3.weight"], original["backbone.fpn.fpn_inner2.weight"]
    )
    torch.testing.assert_close(
        converted["backbone.top_block.p6.weight"], original["backbone.fpn.top_blocks.p6.weight"]
    )
    # 81 reference mask channels: background row 0 dropped, class k is the reference's k + 1.
    torch.testing.assert_close(
        converted["mask_head.predictor.weight"],
        original["mask.predictor.mask_fcn_logits.weight"][1:],
    )
    torch.testing.assert_close(
        converted["mask_head.predictor.bias"], original["mask.predictor.mask_fcn_logits.bias"][1:]
    )


def test_frozen_bn_computes_reference_function(r50, tmp_path):
    # The reference's FrozenBatchNorm2d has no epsilon and computes x * scale + bias with
    # scale = weight / sqrt(var), bias = bias - mean * scale; the original configs give the same
    # bits at test time (detectron2's fused F.batch_norm rounds differently).
    cfg, _, original = r50
    converted, _ = _convert(cfg, original, tmp_path)
    model = build_model(cfg).eval()
    model.load_state_dict(converted, strict=False)
    norm = model.backbone.bottom_up.stem.conv1.norm
    x = torch.randn(2, 64, 16, 16)
    p = "backbone.body.stem.bn1."
    w, b, m, v = (original[p + k] for k in ("weight", "bias", "running_mean", "running_var"))
    scale = w * v.rsqrt()
    expected = x * scale.view(1, -1, 1, 1) + (b - m * scale).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.equal(norm(x), expected)


def test_head_outputs_decode_to_reference_boxes(r50, tmp_path):
    """
    Each reference anchor's deltas, after conversion, sit in the output channels of the
    detectron2 anchor that has the same box, and decode to the same box.
    """
    cfg, _, original = r50
    original = dict(original)
    gen = torch.Generator().manual_seed(1)
    deltas = torch.randn(9, 4, generator=gen)  # the reference's anchor order
    original["rpn.head.bbox_pred.weight"] = torch.zeros_like(original["rpn.head.bbox_pred.weight"])
    original["rpn.head.bbox_pred.bias"] = deltas.flatten()
    converted, _ = _convert(cfg, original, tmp_path)
    model = build_model(cfg).eval()
    model.load_state_dict(converted, strict=False)

    features = [torch.zeros(1, 256, 4, 4)] * 5
    pred = model.head.bbox_pred(model.head.bbox_subnet(features[0]))[0, :, 0, 0].view(9, 4)
    anchors = model.anchor_generator(features)[0].tensor[:9]  # cell (0, 0) of stride 8
    ours = model.box2box_transform.apply_deltas(pred, anchors)

    # The reference's decoding (box_coder.py, weights 10, 10, 5, 5, inclusive boxes).
    ref_anchors = original["rpn.anchor_generator.cell_anchors.0"]
    widths = ref_anchors[:, 2] - ref_anchors[:, 0] + 1
    heights = ref_anchors[:, 3] - ref_anchors[:, 1] + 1
    ctr_x, ctr_y = ref_anchors[:, 0] + 0.5 * widths, ref_anchors[:, 1] + 0.5 * heights
    dx, dy, dw, dh = deltas[:, 0] / 10, deltas[:, 1] / 10, deltas[:, 2] / 5, deltas[:, 3] / 5
    px, py = dx * widths + ctr_x, dy * heights + ctr_y
    pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
    reference = torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw - 1, py + 0.5 * ph - 1], 1)

    expected = reference[PERM] + torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-5)


def test_group_norm_fpn_keeps_bias(tmp_path):
    cfg = load_config("original/retinamask_R101_GN.yaml")
    original = original_state_dict(depth=101, gn=True)
    converted, summary = _convert(cfg, original, tmp_path)
    assert sorted(summary["not_in_checkpoint"]) == sorted(NEVER_SAVED)
    torch.testing.assert_close(
        converted["backbone.fpn_output4.bias"], original["backbone.fpn.fpn_layer3.0.bias"]
    )
    torch.testing.assert_close(
        converted["backbone.fpn_output4.norm.weight"], original["backbone.fpn.fpn_layer3.1.weight"]
    )
    torch.testing.assert_close(
        converted["head.cls_subnet.4.weight"], original["rpn.head.cls_tower.4.weight"]
    )
    assert not any("mask_head.mask_fcn1.norm" in k for k in converted)


def test_ddp_prefix_and_legacy_serialization(r50, tmp_path):
    _, _, original = r50
    legacy = tmp_path / "legacy.pth"
    torch.save(trainer_checkpoint(original, ddp=True), legacy, _use_new_zipfile_serialization=False)
    loaded = load_original_checkpoint(str(legacy))
    assert list(loaded) == list(original)
    torch.testing.assert_close(
        loaded["rpn.head.cls_logits.bias"], original["rpn.head.cls_logits.bias"]
    )


def _run_tool(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tools", "convert_original.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )


def test_tool_converts_and_prints_summary(r50, tmp_path):
    _, _, original = r50
    src, dst = tmp_path / "original.pth", tmp_path / "out" / "converted.pth"
    torch.save(trainer_checkpoint(original), src)
    config = os.path.join(REPO_ROOT, "configs", "original", "retinamask_R50.yaml")
    result = _run_tool("--config-file", config, str(src), str(dst))
    assert result.returncode == 0, result.stderr
    assert f"Converted {len(original) - 5} tensors" in result.stdout
    assert "dropped rpn.anchor_generator.cell_anchors.0" in result.stdout
    assert (
        "not in the checkpoint, starts from its initial value: box_reg_loss.running_mean"
        in result.stdout
    )
    assert dst.is_file()


def _detectron2_retinanet_checkpoint(path):
    cfg = load_config("retinanet_R50_1x.yaml")
    torch.save({"model": build_model(cfg).state_dict()}, path)


def _mask_rcnn_like_checkpoint(path):
    sd = {
        "backbone.body.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
        "rpn.head.conv.weight": torch.zeros(256, 256, 3, 3),
        "roi_heads.box.feature_extractor.fc6.weight": torch.zeros(1024, 12544),
    }
    torch.save(trainer_checkpoint(sd), path)


def _truncated_checkpoint(path):
    torch.save(trainer_checkpoint(original_state_dict(depth=50)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, message",
    [
        (None, "no such file"),
        (lambda p: p.write_text("not a checkpoint\n"), "cannot be read as a torch checkpoint"),
        (_truncated_checkpoint, "truncated, corrupt, or not a checkpoint"),
        (_detectron2_retinanet_checkpoint, "It is a detectron2 checkpoint"),
        (_mask_rcnn_like_checkpoint, "['rpn.head.cls_logits.weight'] are absent"),
    ],
    ids=["missing", "text", "truncated", "detectron2", "other-architecture"],
)
def test_tool_rejects_bad_input_with_one_line(tmp_path, make, message):
    src, dst = tmp_path / "original.pth", tmp_path / "converted.pth"
    if make is not None:
        make(src)
    config = os.path.join(REPO_ROOT, "configs", "original", "retinamask_R50.yaml")
    result = _run_tool("--config-file", config, str(src), str(dst))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("convert_original")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == ([src] if make is not None else [])


def test_checkpoint_of_other_config_is_rejected(r50, tmp_path):
    # The R-50 checkpoint does not fit the R-101 config: named, and nothing written.
    _, _, original = r50
    cfg = load_config("original/retinamask_R101.yaml")
    src, dst = tmp_path / "original.pth", tmp_path / "converted.pth"
    torch.save(trainer_checkpoint(original), src)
    with pytest.raises(OriginalCheckpointError, match="needs and the checkpoint lacks"):
        convert_original_file(cfg, str(src), str(dst))
    assert not dst.exists()


@pytest.mark.parametrize(
    "name", ["retinamask_R50.yaml", "retinamask_R101_GN.yaml", "retinamask_X101_32x8d_GN.yaml"]
)
def test_training_configs_build_the_released_network(name):
    # A model trained with a COCO config has the weights (names and shapes) of the authors'
    # model that configs/original/ loads, so either initializes the other.
    def shapes(cfg):
        return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}

    assert shapes(load_config(name)) == shapes(load_config("original/" + name))
