import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import CONFIG_DIR, REPO_ROOT, load_config
from retinamask_d2 import InputError
from retinamask_d2.export import (
    GRAPH_TOLERANCE,
    _inference_before_postprocess,
    box_only_config,
    check_graph,
    load_graph,
    trace_graph,
)

_spec = importlib.util.spec_from_file_location(
    "export_model", os.path.join(REPO_ROOT, "tools", "export_model.py")
)
export_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_model)


def main(argv):
    """tools/export_model.py with the command-line arguments ``argv``."""
    export_model.main(export_model.get_parser().parse_args(argv))


CONFIG = os.path.join(CONFIG_DIR, "synthetic", "retinamask_synthetic.yaml")
# The graphs are traced at 128x128 (the sample image) and checked at other sizes too.
CHECK_SIZES = [(96, 160), (160, 112)]


def _write_image(path, seed, size=(128, 128)):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (*size, 3), dtype=np.uint8) + 150
    for _ in range(6):
        x, y = rng.integers(0, min(size) - 20, 2)
        w, h = rng.integers(8, 40, 2)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), color, -1)
    cv2.imwrite(str(path), img)
    return str(path)


def _as_input(image_path):
    return torch.as_tensor(cv2.imread(image_path).astype("float32").transpose(2, 0, 1))


def _eager(weights, *opts):
    cfg = load_config(CONFIG, "MODEL.WEIGHTS", weights, *opts)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """
    Seeded weights whose detection scores spread over about (0.2, 1) and mask probabilities
    over (0, 1), so that a graph that computes anything differently shows in its outputs (the
    untrained model scores its top 100 between 0.014 and 0.020 and predicts mask probabilities
    between 0.495 and 0.505); the sample image (128x128) and two check images of other sizes.
    """
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG))
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls_score.weight, std=0.2)
        torch.nn.init.constant_(model.head.cls_score.bias, -10.0)
        torch.nn.init.normal_(model.mask_head.predictor.weight, std=0.5)
    # Move the loss statistics off their defaults, so that dropping them is visible.
    model.box_reg_loss.running_mean.fill_(0.05)
    DetectionCheckpointer(model, save_dir=str(root)).save("model_final")
    sample = _write_image(root / "sample.png", 0)
    images = [_write_image(root / f"check{i}.png", i + 1, s) for i, s in enumerate(CHECK_SIZES)]

    with torch.no_grad():
        out = _inference_before_postprocess(model.eval(), [{"image": _as_input(images[0])}])
    out = out[0]["instances"]
    assert len(out) == 100 and out.scores.min() < 0.3 and out.scores.max() > 0.9
    masks = out.pred_masks[:50]
    assert (masks < 0.1).float().mean() > 0.1 and (masks > 0.9).float().mean() > 0.1
    return str(root / "model_final.pth"), sample, images


def test_box_only_export_runs_with_plain_detectron2(checkpoint, tmp_path):
    weights, _, images = checkpoint
    out = tmp_path / "box_only"
    main(["--format", "box-only", "--config-file", CONFIG, "--output", str(out),
          "MODEL.WEIGHTS", weights])  # fmt: skip
    assert sorted(os.listdir(out)) == ["config.yaml", "model_final.pth"]
    state = torch.load(out / "model_final.pth")["model"]
    assert not [k for k in state if k.startswith(("mask_head", "box_reg_loss", "loss_norm"))]

    # A fresh python in which retinamask_d2 cannot be imported at all.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["retinamask_d2"] = None
        import cv2, torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
        cfg = get_cfg()
        cfg.merge_from_file({str(out / "config.yaml")!r})
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg).eval()
        incompatible = DetectionCheckpointer(model)._load_model(torch.load(cfg.MODEL.WEIGHTS))
        assert not incompatible.missing_keys and not incompatible.unexpected_keys, incompatible
        image = torch.as_tensor(cv2.imread({images[0]!r}).astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            out = model([{{"image": image}}])[0]["instances"]
        torch.save({{"arch": type(model).__name__, **out.get_fields()}}, {str(tmp_path / "d2.pth")!r})
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path), env=env)
    plain = torch.load(tmp_path / "d2.pth", weights_only=False)
    assert plain["arch"] == "RetinaNet"

    ours = _eager(weights, "MODEL.MASK_ON", False)
    with torch.no_grad():
        expected = ours([{"image": _as_input(images[0])}])[0]["instances"]
    assert len(expected) == 100
    assert torch.equal(plain["pred_boxes"].tensor, expected.pred_boxes.tensor)
    assert torch.equal(plain["scores"], expected.scores)
    assert torch.equal(plain["pred_classes"], expected.pred_classes)


@pytest.mark.parametrize(
    "config, needs_retinamask_d2",
    [
        ("retinamask_R50.yaml", ["BACKBONE.NAME", "ANCHOR_GENERATOR.NAME"]),
        (
            "original/retinamask_R50.yaml",
            [
                "RETINAMASK.TEST_RESIZE 'reference'",
                "RETINAMASK.CLIP_BEFORE_NMS True",
                "BACKBONE.NAME",
                "ANCHOR_GENERATOR.NAME",
            ],
        ),
    ],
)
def test_box_only_export_refuses_a_network_plain_detectron2_cannot_build(
    config, needs_retinamask_d2, tmp_path
):
    out = tmp_path / "box_only"
    # Refused before the weights are read: this file does not even exist.
    args = ["--format", "box-only", "--config-file", os.path.join(CONFIG_DIR, config),
            "--output", str(out), "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")]  # fmt: skip
    with pytest.raises(InputError) as e:
        main(args)
    message = str(e.value)
    assert "\n" not in message
    for name in needs_retinamask_d2:
        assert f"MODEL.{name}" in message
    assert "(registered by retinamask_d2.original)" in message
    assert "--format torchscript or --format onnx" in message
    assert not out.exists()


def test_box_only_config_refuses_a_key_detectron2_does_not_have():
    cfg = load_config(CONFIG)
    cfg.MODEL.RETINANET.EXTRA_KEY = 1
    with pytest.raises(InputError, match=r"lacks MODEL.RETINANET.EXTRA_KEY \(a key detectron2"):
        box_only_config(cfg)


@pytest.mark.parametrize("mask_on", [True, False], ids=["masks", "box-only"])
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_graph_matches_eager_at_other_sizes(checkpoint, tmp_path, fmt, mask_on):
    weights, sample, images = checkpoint
    args = ["--format", fmt, "--config-file", CONFIG, "--output", str(tmp_path),
            "--sample-image", sample, "MODEL.WEIGHTS", weights]  # fmt: skip
    main(args if mask_on else ["--no-masks", *args])
    report = json.loads((tmp_path / "outputs.json").read_text())
    # The export checked the sample image and two resized copies of it.
    assert list(report["max_abs_diff"]) == ["128x128", "96x160", "160x112"]
    masks = ["pred_masks"] if mask_on else []
    assert report["outputs"] == ["pred_boxes", "pred_classes", *masks, "scores", "image_size"]

    # The written graph, on other images of other sizes than the traced one.
    graph = load_graph(report["path"], report["outputs"])
    model = _eager(weights, "MODEL.MASK_ON", mask_on)
    inputs = [_as_input(p) for p in images]
    diffs = check_graph(model, graph, inputs, GRAPH_TOLERANCE[fmt])
    assert list(diffs) == ["96x160", "160x112"]

    # Every output is required.
    def incomplete(x):
        return {k: v for k, v in graph(x).items() if k != "scores"}

    with pytest.raises(AssertionError, match="96x160: the graph returned"):
        check_graph(model, incomplete, inputs, GRAPH_TOLERANCE[fmt])
    if mask_on:
        # All 100 detections, masks predicted for the top 50 and zero for the others.
        masks = graph(inputs[0])["pred_masks"]
        assert masks.shape == (100, 1, 28, 28)
        assert masks[:50].flatten(1).any(dim=1).all() and not masks[50:].any()


def test_graph_with_the_reference_conventions_matches_eager_at_other_sizes(checkpoint, tmp_path):
    # The test-time conventions of configs/original: boxes clipped before NMS, to the size of
    # each input rather than the traced one; inclusive mask boxes; the reference's mask paste.
    weights, sample, images = checkpoint
    model = _eager(
        weights,
        *["MODEL.RETINAMASK.CLIP_BEFORE_NMS", True, "MODEL.RETINAMASK.INCLUSIVE_MASK_BOXES", True],
        *["MODEL.RETINAMASK.MASK_PASTE", "reference"],
    )
    path, names = trace_graph(model, _as_input(sample), "torchscript", str(tmp_path))
    graph = load_graph(path, names)
    check_graph(model, graph, [_as_input(p) for p in images], GRAPH_TOLERANCE["torchscript"])


def test_a_graph_with_unaligned_roialign_fails_the_check(checkpoint, tmp_path):
    # Detectron2's default ONNX opset 11 makes this graph: the mask pooler's RoIAlign without
    # aligned=True (ROIAlign instead of ROIAlignV2).
    weights, sample, images = checkpoint
    wrong = _eager(weights, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlign")
    path, names = trace_graph(wrong, _as_input(sample), "torchscript", str(tmp_path))
    graph = load_graph(path, names)
    with pytest.raises(AssertionError, match="96x160 image, pred_masks"):
        check_graph(_eager(weights), graph, [_as_input(p) for p in images], GRAPH_TOLERANCE["onnx"])


def test_export_needs_weights_and_an_existing_config(tmp_path):
    with pytest.raises(InputError, match="nope.yaml' does not exist"):
        main(["--format", "onnx", "--config-file", "nope.yaml", "--output", str(tmp_path)])
    with pytest.raises(InputError, match="MODEL.WEIGHTS"):
        main(["--format", "onnx", "--config-file", CONFIG, "--output", str(tmp_path)])
