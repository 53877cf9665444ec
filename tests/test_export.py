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
from retinamask_d2.export import GRAPH_TOLERANCE, _inference_before_postprocess

_spec = importlib.util.spec_from_file_location(
    "export_model", os.path.join(REPO_ROOT, "tools", "export_model.py")
)
export_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_model)


def main(argv):
    """tools/export_model.py with the command-line arguments ``argv``."""
    export_model.main(export_model.get_parser().parse_args(argv))


CONFIG = os.path.join(CONFIG_DIR, "synthetic", "retinamask_synthetic.yaml")
# An untrained model scores every anchor about 0.01: a threshold of 0 gives full detection sets.
OPTS = ["MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]


def _write_image(path, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (128, 128, 3), dtype=np.uint8) + 150
    for _ in range(4):
        x, y = rng.integers(10, 100, 2)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.rectangle(img, (int(x), int(y)), (int(x) + 25, int(y) + 15), color, -1)
    cv2.imwrite(str(path), img)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(CONFIG, *OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    # Move the loss statistics off their defaults, so that dropping them is visible.
    model.box_reg_loss.running_mean.fill_(0.05)
    DetectionCheckpointer(model, save_dir=str(root)).save("model_final")
    images = [_write_image(root / f"image{i}.png", i) for i in range(2)]
    return str(root / "model_final.pth"), images


def _eager(weights, image, mask_on=True):
    cfg = load_config(CONFIG, *OPTS, "MODEL.WEIGHTS", weights, "MODEL.MASK_ON", mask_on)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return model


def _as_input(image_path):
    return torch.as_tensor(cv2.imread(image_path).astype("float32").transpose(2, 0, 1))


def test_box_only_export_runs_with_plain_detectron2(checkpoint, tmp_path):
    weights, images = checkpoint
    out = tmp_path / "box_only"
    main(["--format", "box-only", "--config-file", CONFIG, "--output", str(out),
          "MODEL.WEIGHTS", weights, *OPTS])  # fmt: skip
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
        image = torch.as_tensor(cv2.imread({images[1]!r}).astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            out = model([{{"image": image}}])[0]["instances"]
        torch.save({{"arch": type(model).__name__, **out.get_fields()}}, {str(tmp_path / "d2.pth")!r})
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path), env=env)
    plain = torch.load(tmp_path / "d2.pth", weights_only=False)
    assert plain["arch"] == "RetinaNet"

    ours = _eager(weights, images[1], mask_on=False)
    with torch.no_grad():
        expected = ours([{"image": _as_input(images[1])}])[0]["instances"]
    assert len(expected) == 100
    assert torch.equal(plain["pred_boxes"].tensor, expected.pred_boxes.tensor)
    assert torch.equal(plain["scores"], expected.scores)
    assert torch.equal(plain["pred_classes"], expected.pred_classes)


def _check_graph(run, weights, image_path, mask_on, fmt):
    model = _eager(weights, image_path, mask_on)
    with torch.no_grad():
        expected = _inference_before_postprocess(model, [{"image": _as_input(image_path)}])
    fields = expected[0]["instances"].get_fields()
    expected = [fields[k] for k in sorted(fields)]
    actual = run(_as_input(image_path))
    rtol, atol = GRAPH_TOLERANCE[fmt]
    for e, a in zip(expected, actual):
        e = e.tensor if hasattr(e, "tensor") else e
        torch.testing.assert_close(a.to(e.dtype), e, rtol=rtol, atol=atol)
    return expected


@pytest.mark.parametrize("mask_on", [True, False], ids=["masks", "box-only"])
def test_torchscript_matches_eager(checkpoint, tmp_path, mask_on):
    weights, images = checkpoint
    args = ["--format", "torchscript", "--config-file", CONFIG, "--output", str(tmp_path),
            "--sample-image", images[0], "MODEL.WEIGHTS", weights, *OPTS]  # fmt: skip
    main(args if mask_on else ["--no-masks", *args])
    report = json.loads((tmp_path / "outputs.json").read_text())
    assert ("pred_masks" in report["outputs"]) == mask_on
    ts = torch.jit.load(str(tmp_path / "model.ts"))
    # Checked on an image other than the one it was traced on.
    expected = _check_graph(lambda x: ts(x), weights, images[1], mask_on, "torchscript")
    if mask_on:
        # All 100 detections, masks predicted for the top 50 and zero for the others.
        assert expected[2].shape == (100, 1, 28, 28)
        assert (expected[2][:50] > 0).all() and not expected[2][50:].any()


@pytest.mark.parametrize("mask_on", [True, False], ids=["masks", "box-only"])
def test_onnx_matches_eager(checkpoint, tmp_path, mask_on):
    import onnxruntime

    weights, images = checkpoint
    args = ["--format", "onnx", "--config-file", CONFIG, "--output", str(tmp_path),
            "--sample-image", images[0], "MODEL.WEIGHTS", weights, *OPTS]  # fmt: skip
    main(args if mask_on else ["--no-masks", *args])
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    name = session.get_inputs()[0].name

    def run(x):
        return [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]

    _check_graph(run, weights, images[1], mask_on, "onnx")


def test_export_needs_weights_and_an_existing_config(tmp_path):
    with pytest.raises(InputError, match="nope.yaml' does not exist"):
        main(["--format", "onnx", "--config-file", "nope.yaml", "--output", str(tmp_path)])
    with pytest.raises(InputError, match="MODEL.WEIGHTS"):
        main(["--format", "onnx", "--config-file", CONFIG, "--output", str(tmp_path)])
