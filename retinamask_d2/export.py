"""
Export a trained RetinaMask for deployment (the functions of tools/export_model.py): a checkpoint
and config for detectron2's stock RetinaNet, or a traced TorchScript or ONNX graph.

The graphs are traced with detectron2's export API (:class:`detectron2.export.TracingAdapter`).
Their input is one image tensor (3, H, W) in the config's INPUT.FORMAT, already resized as
:class:`DefaultPredictor` does; their outputs, listed in ``DIR/outputs.json``, are the fields of
the detections before they are scaled to the original image size, with masks as 28x28 RoI
probabilities (detectron2's ``detector_postprocess`` pastes them). Each export is run once on a
sample image and compared with the eager model; it fails if they differ beyond the tolerance.
"""
import json
import logging
import os
import statistics
import time

import torch

from detectron2.data import build_detection_test_loader, detection_utils
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model

from .checkpoint import AtomicDetectionCheckpointer


__all__ = ["export_box_only", "export_graph", "sample_image", "BOX_ONLY_DROPPED_PREFIXES", "GRAPH_TOLERANCE"]

logger = logging.getLogger(__name__)

# State dict entries that only RetinaMask's training uses: detectron2's RetinaNet has no use
# for them.
BOX_ONLY_DROPPED_PREFIXES = ("mask_head.", "box_reg_loss.", "loss_normalizer")

# (rtol, atol) between an exported graph and the eager model; atol is in pixels for boxes and
# in probability for scores and masks. TorchScript runs the same kernels; onnxruntime's
# convolutions and RoIAlign accumulate in a different order.
GRAPH_TOLERANCE = {"torchscript": (1e-5, 1e-4), "onnx": (1e-4, 1e-3)}

# detectron2 exports with opset 11, where torchvision's RoIAlign symbolic silently drops
# aligned=True (the ROIAlignV2 of the mask pooler); opset 16 keeps it.
ONNX_OPSET = 16


def _load_model(cfg):
    model = build_model(cfg)
    AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def export_box_only(cfg, output_dir):
    """
    Write ``output_dir/model_final.pth`` and ``output_dir/config.yaml``: the detector of a
    RetinaMask checkpoint as a checkpoint and a config for detectron2's stock ``RetinaNet``,
    which run with plain detectron2.

    Returns:
        (str, str): the checkpoint and config paths.
    """
    if cfg.MODEL.META_ARCHITECTURE != "RetinaMask":
        raise ValueError(
            f"--format box-only converts a RetinaMask config, got MODEL.META_ARCHITECTURE="
            f"{cfg.MODEL.META_ARCHITECTURE!r}."
        )
    os.makedirs(output_dir, exist_ok=True)
    model = _load_model(cfg)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith(BOX_ONLY_DROPPED_PREFIXES)
    }
    weights = os.path.abspath(os.path.join(output_dir, "model_final.pth"))
    torch.save({"model": state}, weights)

    box_cfg = cfg.clone()
    box_cfg.defrost()
    box_cfg.MODEL.pop("RETINAMASK")  # keys plain detectron2 does not know
    box_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    box_cfg.MODEL.MASK_ON = False
    box_cfg.MODEL.WEIGHTS = weights
    config = os.path.join(output_dir, "config.yaml")
    with open(config, "w") as f:
        f.write(box_cfg.dump())
    logger.info(f"Wrote detectron2 RetinaNet checkpoint {weights} and config {config}")
    return weights, config


def _inference_before_postprocess(model, inputs):
    # The detector's outputs at the network's input resolution: DenseDetector.forward without
    # detector_postprocess, whose mask pasting is left to the caller, as detectron2 does when
    # it exports Mask R-CNN.
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    results = model.forward_inference(images, features, model.head(features))
    return [{"instances": r} for r in results]


def _output_names(model, image):
    # TracingAdapter flattens an Instances into its fields sorted by name, then its image size.
    with torch.no_grad():
        instances = _inference_before_postprocess(model, [{"image": image}])[0]["instances"]
    return sorted(instances.get_fields()) + ["image_size"]


def export_graph(cfg, output_dir, image, fmt):
    """
    Trace the model of ``cfg`` on ``image`` into ``output_dir/model.ts`` (TorchScript) or
    ``output_dir/model.onnx`` (ONNX, checked with onnxruntime), check it against the eager
    model on ``image`` and time both.

    Returns:
        dict: the path, output names, largest difference per output and median latencies.
    """
    if fmt not in GRAPH_TOLERANCE:
        raise ValueError(f"Unknown graph format {fmt!r}; use one of {sorted(GRAPH_TOLERANCE)}.")
    os.makedirs(output_dir, exist_ok=True)
    model = _load_model(cfg)
    # eval(): the ONNX exporter restores the wrapper's mode afterwards, and a new module is in
    # training mode, which would switch the wrapped model to training.
    adapter = TracingAdapter(model, [{"image": image}], _inference_before_postprocess).eval()
    names = _output_names(model, image)
    with torch.no_grad():
        if fmt == "torchscript":
            path = os.path.join(output_dir, "model.ts")
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
            traced.save(path)
            run = torch.jit.load(path)
        else:
            import onnxruntime

            path = os.path.join(output_dir, "model.onnx")
            # detectron2's exporter relies on TorchScript-based ONNX export (ROIAlign and NMS
            # symbolics registered by torchvision); the dynamo exporter cannot follow the
            # data-dependent shapes of detection post-processing.
            torch.onnx.export(
                adapter, (image,), path, opset_version=ONNX_OPSET, dynamo=False
            )
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            input_name = session.get_inputs()[0].name

            def run(x):
                return [torch.from_numpy(o) for o in session.run(None, {input_name: x.numpy()})]

        expected = adapter(image)
        actual = run(image)
        report = _compare(names, expected, actual, *GRAPH_TOLERANCE[fmt])
        report["latency_s"] = {
            "eager": _median_time(lambda: adapter(image)),
            fmt: _median_time(lambda: run(image)),
        }
    report.update(path=path, outputs=names, format=fmt)
    with open(os.path.join(output_dir, "outputs.json"), "w") as f:
        json.dump(report, f, indent=2)
    logger.info(f"Wrote {path}: {json.dumps(report)}")
    return report


def _compare(names, expected, actual, rtol, atol):
    if len(expected) != len(actual):
        raise RuntimeError(f"The exported graph returned {len(actual)} outputs, not {len(expected)}.")
    diffs = {}
    for name, e, a in zip(names, expected, actual):
        a = a.to(e.dtype)
        if e.shape != a.shape:
            raise RuntimeError(
                f"Exported output {name} has shape {tuple(a.shape)}, the eager model's "
                f"{tuple(e.shape)}."
            )
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        diffs[name] = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
    return {"max_abs_diff": diffs, "tolerance": {"rtol": rtol, "atol": atol}}


def _median_time(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sample_image(cfg, path=""):
    """A test input, resized as DefaultPredictor and the test loader do."""
    if not path:
        batch = next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))
        return batch[0]["image"].float()
    original = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    image = aug.get_transform(original).apply_image(original)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
