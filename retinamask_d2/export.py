"""
The functions of tools/export_model.py, whose docstring describes the exported files. Graphs are
traced with :class:`detectron2.export.TracingAdapter` and stop before ``detector_postprocess``
(as detectron2's Mask R-CNN export); each must match the eager model within
:data:`GRAPH_TOLERANCE` on a sample image.
"""

import json
import logging
import os
import statistics
import timeit

import torch

from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model

from .checkpoint import AtomicDetectionCheckpointer
from .config import InputError
from .conventions import build_test_resize

__all__ = ["export_box_only", "export_graph", "sample_image"]

logger = logging.getLogger(__name__)

# State dict entries of RetinaMask's training only, which detectron2's RetinaNet lacks.
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
    RetinaMask checkpoint for detectron2's stock ``RetinaNet``, which runs with plain detectron2.

    Returns:
        (str, str): the checkpoint and config paths.
    """
    if cfg.MODEL.META_ARCHITECTURE != "RetinaMask":
        raise InputError(
            f"--format box-only converts a RetinaMask config, not MODEL.META_ARCHITECTURE "
            f"{cfg.MODEL.META_ARCHITECTURE!r}: pass one such as configs/retinamask_R50.yaml."
        )
    os.makedirs(output_dir, exist_ok=True)
    state = _load_model(cfg).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(BOX_ONLY_DROPPED_PREFIXES)}
    weights = os.path.abspath(os.path.join(output_dir, "model_final.pth"))
    torch.save({"model": state}, weights)

    box_cfg = cfg.clone()
    box_cfg.defrost()
    box_cfg.MODEL.pop("RETINAMASK")  # keys plain detectron2 does not know
    box_cfg.MODEL.update(META_ARCHITECTURE="RetinaNet", MASK_ON=False, WEIGHTS=weights)
    config = os.path.join(output_dir, "config.yaml")
    with open(config, "w") as f:
        f.write(box_cfg.dump())
    logger.info(f"Wrote detectron2 RetinaNet checkpoint {weights} and config {config}")
    return weights, config


def _inference_before_postprocess(model, inputs):
    # DenseDetector.forward without detector_postprocess: detections at the network's input
    # resolution, masks not pasted.
    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    results = model.forward_inference(images, features, model.head(features))
    return [{"instances": r} for r in results]


@torch.no_grad()
def export_graph(cfg, output_dir, image, fmt):
    """
    Trace the model of ``cfg`` on ``image`` (3, H, W) into ``output_dir/model.ts`` or
    ``model.onnx`` (run with onnxruntime), check it against the eager model and time both.

    Returns:
        dict: the path, output names, largest difference per output and median latencies.
    """
    if fmt not in GRAPH_TOLERANCE:
        raise InputError(f"Unknown graph format {fmt!r}; use one of {sorted(GRAPH_TOLERANCE)}.")
    os.makedirs(output_dir, exist_ok=True)
    model = _load_model(cfg)
    # eval(): the ONNX exporter restores the wrapper's mode afterwards, and a new module is in
    # training mode, which would switch the wrapped model to training.
    adapter = TracingAdapter(model, [{"image": image}], _inference_before_postprocess).eval()
    instances = _inference_before_postprocess(model, [{"image": image}])[0]["instances"]
    # TracingAdapter flattens an Instances into its fields sorted by name, then its size.
    names = sorted(instances.get_fields()) + ["image_size"]
    if fmt == "torchscript":
        path = os.path.join(output_dir, "model.ts")
        torch.jit.trace(adapter, (image,), check_trace=False).save(path)
        run = torch.jit.load(path)
    else:
        import onnxruntime

        path = os.path.join(output_dir, "model.onnx")
        # The dynamo exporter cannot follow the data-dependent shapes of detection
        # post-processing; the TorchScript-based one has torchvision's RoIAlign and NMS.
        torch.onnx.export(adapter, (image,), path, opset_version=ONNX_OPSET, dynamo=False)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(x):
            return [torch.from_numpy(o) for o in session.run(None, {input_name: x.numpy()})]

    report = _compare(names, adapter(image), run(image), *GRAPH_TOLERANCE[fmt])
    report["latency_s"] = {"eager": _median_time(adapter, image), fmt: _median_time(run, image)}
    report.update(path=path, outputs=names, format=fmt)
    with open(os.path.join(output_dir, "outputs.json"), "w") as f:
        json.dump(report, f, indent=2)
    logger.info(f"Wrote {path}: {json.dumps(report)}")
    return report


def _compare(names, expected, actual, rtol, atol):
    if len(expected) != len(actual):
        raise RuntimeError(f"The graph returned {len(actual)} outputs, not {len(expected)}.")
    diffs = {}
    for name, e, a in zip(names, expected, actual):
        # assert_close also fails, naming the output, when the shapes differ.
        a = a.to(e.dtype)
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        diffs[name] = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
    return {"max_abs_diff": diffs, "tolerance": {"rtol": rtol, "atol": atol}}


def _median_time(fn, x, repeats=5):
    fn(x)  # warm-up
    return statistics.median(timeit.repeat(lambda: fn(x), number=1, repeat=repeats))


def sample_image(cfg, path=""):
    """A test input (3, H, W): ``path``, else the first test image, as the test loader maps it."""
    if path:
        mapper = DatasetMapper(cfg, is_train=False, augmentations=[build_test_resize(cfg)])
        return mapper({"file_name": path})["image"].float()
    batch = next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))
    return batch[0]["image"].float()
