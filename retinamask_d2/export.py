"""
The functions of tools/export_model.py, whose docstring describes the exported files.

``--format box-only`` writes a config and checkpoint for plain detectron2 when detectron2's own
components build the network, and refuses before writing anything when they cannot. Graphs are
traced with :class:`detectron2.export.TracingAdapter` and stop before ``detector_postprocess``
(as detectron2's Mask R-CNN export); each must match the eager model within
:data:`GRAPH_TOLERANCE` on a sample image and on two resized copies of it.
"""

import json
import logging
import os
import statistics
import timeit

import torch
from torch.nn import functional as F

import detectron2.modeling
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.export import TracingAdapter
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.utils.registry import Registry

from .checkpoint import AtomicDetectionCheckpointer
from .config import InputError
from .conventions import build_test_resize
from .retinamask import RetinaMask

__all__ = [
    "box_only_config",
    "check_graph",
    "export_box_only",
    "export_graph",
    "load_graph",
    "sample_image",
    "trace_graph",
]

logger = logging.getLogger(__name__)

# State dict entries of RetinaMask's training only, which detectron2's RetinaNet lacks.
BOX_ONLY_DROPPED_PREFIXES = ("mask_head.", "box_reg_loss.", "loss_normalizer")
# MODEL.RETINAMASK keys that change box-only detections or their COCO results
# (retinamask_d2/conventions.py), with the values that are detectron2's RetinaNet: its test-time
# resize, boxes clipped after NMS, its COCO boxes.
RETINANET_TEST_CONVENTIONS = {
    "TEST_RESIZE": "detectron2",
    "CLIP_BEFORE_NMS": False,
    "COCO_BOXES": "detectron2",
}

# (rtol, atol) per output between an exported graph and the eager model, |graph - eager| <=
# atol + rtol * |eager|: pixels for boxes, probability for scores and masks; pred_classes and
# image_size must be equal. Measured on the seeded, calibrated model of tests/test_export.py
# (scores 0.19-0.99, mask probabilities 0-1), traced at 128x128 and run at 128x128, 96x160 and
# 160x112, with and without masks; check_graph logs the differences:
#     python3 -m pytest tests/test_export.py -q -k other_sizes -o log_cli=true --log-cli-level=INFO
# TorchScript runs the same kernels and differed by 0; onnxruntime accumulates convolutions and
# RoIAlign in another order: boxes 4.6e-5 px, scores 9.9e-6, masks 5.2e-6. The tolerances are
# 2-5 times that, and boxes get 1e-6 of their coordinate besides, as float32 rounding grows with
# it. A mask pooler with an unaligned RoIAlign changes masks by up to 0.8 on the same inputs.
GRAPH_TOLERANCE = {
    "torchscript": {"pred_boxes": (1e-6, 0.0), "scores": (1e-6, 0.0), "pred_masks": (1e-6, 0.0)},
    "onnx": {"pred_boxes": (1e-6, 1e-4), "scores": (0.0, 5e-5), "pred_masks": (0.0, 2e-5)},
}

# detectron2 exports with opset 11, where torchvision's RoIAlign symbolic silently drops
# aligned=True (the ROIAlignV2 of the mask pooler); opset 16 keeps it.
ONNX_OPSET = 16


def _load_model(cfg):
    model = build_model(cfg)
    AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _leaves(cfg):
    return {k.replace("/", "."): v for k, v in flatten_results_dict(cfg).items()}


def _not_in_detectron2(cfg):
    """
    What of ``cfg`` plain detectron2 cannot build: keys its ``get_cfg()`` lacks, and model
    registry names (``MODEL.META_ARCHITECTURE``, ``MODEL.*NAME``) changed from its defaults
    to an object that detectron2 itself does not register.
    """
    defaults = _leaves(get_cfg())
    registries = [r for r in vars(detectron2.modeling).values() if isinstance(r, Registry)]
    found = []
    for key, value in _leaves(cfg).items():
        if key not in defaults:
            found.append(f"{key} (a key detectron2 does not have)")
        elif (
            key.startswith("MODEL.")
            and key.endswith(("META_ARCHITECTURE", "NAME"))
            and value != defaults[key]
        ):
            modules = [r.get(value).__module__ for r in registries if value in r]
            if not any(m.startswith("detectron2.") for m in modules):
                where = f"registered by {', '.join(modules)}" if modules else "not registered"
                found.append(f"{key} {value!r} ({where})")
    return found


def box_only_config(cfg):
    """
    The config of detectron2's ``RetinaNet`` for the box-only detector of RetinaMask config
    ``cfg``: ``MODEL.RETINAMASK`` removed, ``MASK_ON`` False.

    Raises:
        InputError: ``cfg`` is not a RetinaMask config, or plain detectron2 cannot build the
            result: it names a component that only retinamask_d2 (or another package)
            registers, such as the reference's backbone and rounded anchors, has a key
            detectron2 does not know, or a test-time convention RetinaNet does not have.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in META_ARCH_REGISTRY or not issubclass(META_ARCH_REGISTRY.get(arch), RetinaMask):
        raise InputError(
            f"--format box-only converts a RetinaMask config, not MODEL.META_ARCHITECTURE "
            f"{arch!r}: pass one such as configs/synthetic/retinamask_synthetic.yaml."
        )
    box_cfg = cfg.clone()
    box_cfg.defrost()
    retinamask = box_cfg.MODEL.pop("RETINAMASK")
    # Box-only RetinaMask is RetinaNet at test time, less its empty boxes (README, "Box-only
    # deployment"), with these keys at RetinaNet's values; a subclass keeps its own name.
    box_cfg.MODEL.update(
        META_ARCHITECTURE="RetinaNet" if arch == "RetinaMask" else arch, MASK_ON=False
    )
    missing = [
        f"MODEL.RETINAMASK.{key} {retinamask[key]!r} (RetinaNet's is {value!r})"
        for key, value in RETINANET_TEST_CONVENTIONS.items()
        if retinamask[key] != value
    ]
    missing += _not_in_detectron2(box_cfg)
    if missing:
        raise InputError(
            f"--format box-only writes a config for plain detectron2, which lacks "
            f"{', '.join(missing)}. Export a graph instead, with --format torchscript or "
            f"--format onnx: it runs without retinamask_d2."
        )
    return box_cfg


def export_box_only(cfg, output_dir):
    """
    Write ``output_dir/model_final.pth`` and ``output_dir/config.yaml``: the detector of a
    RetinaMask checkpoint for detectron2's stock ``RetinaNet``, which plain detectron2 builds.
    Nothing is written when :func:`box_only_config` refuses ``cfg``.

    Returns:
        (str, str): the checkpoint and config paths.
    """
    box_cfg = box_only_config(cfg)
    state = _load_model(cfg).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(BOX_ONLY_DROPPED_PREFIXES)}
    os.makedirs(output_dir, exist_ok=True)
    weights = os.path.abspath(os.path.join(output_dir, "model_final.pth"))
    torch.save({"model": state}, weights)
    box_cfg.MODEL.WEIGHTS = weights
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


def _named_outputs(model, image):
    """The eager model's detections on ``image`` (3, H, W) as a graph returns them, by name."""
    instances = _inference_before_postprocess(model, [{"image": image}])[0]["instances"]
    outputs = {k: getattr(v, "tensor", v) for k, v in instances.get_fields().items()}
    return {**outputs, "image_size": torch.tensor(instances.image_size)}


def _named(names, outputs):
    if len(outputs) != len(names):
        raise AssertionError(f"The graph returned {len(outputs)} outputs, not {len(names)}.")
    return dict(zip(names, outputs))


def trace_graph(model, image, fmt, output_dir):
    """
    Trace ``model`` on ``image`` (3, H, W) into ``output_dir/model.ts`` or ``model.onnx``.

    Returns:
        (str, list[str]): the path and the names of the graph's outputs, in order.
    """
    # TracingAdapter flattens an Instances into its fields sorted by name, then its size.
    instances = _inference_before_postprocess(model, [{"image": image}])[0]["instances"]
    names = sorted(instances.get_fields()) + ["image_size"]
    # eval(): the ONNX exporter restores the wrapper's mode afterwards, and a new module is in
    # training mode, which would switch the wrapped model to training.
    adapter = TracingAdapter(model, [{"image": image}], _inference_before_postprocess).eval()
    if fmt == "torchscript":
        path = os.path.join(output_dir, "model.ts")
        torch.jit.trace(adapter, (image,), check_trace=False).save(path)
    else:
        path = os.path.join(output_dir, "model.onnx")
        # The dynamo exporter cannot follow the data-dependent shapes of detection
        # post-processing; the TorchScript-based one has torchvision's RoIAlign and NMS.
        detections = {n: {0: "detections"} for n in names if n != "image_size"}
        torch.onnx.export(
            adapter,
            (image,),
            path,
            opset_version=ONNX_OPSET,
            dynamo=False,
            input_names=["image"],
            output_names=names,
            dynamic_axes={"image": {1: "height", 2: "width"}, **detections},
        )
    return path, names


def load_graph(path, names):
    """
    A written graph as a function (3, H, W) image -> {output name: tensor}; ``names`` are the
    outputs listed in ``outputs.json`` (an ONNX graph carries them too).
    """
    if path.endswith(".ts"):
        graph = torch.jit.load(path)
        return lambda x: _named(names, graph(x))
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    graph_names = [o.name for o in session.get_outputs()]
    if graph_names != list(names):
        raise AssertionError(f"The graph's outputs are {graph_names}, not {list(names)}.")
    return lambda x: _named(
        names, [torch.from_numpy(o) for o in session.run(None, {"image": x.numpy()})]
    )


@torch.no_grad()
def check_graph(model, graph, images, tolerance):
    """
    Compare ``graph`` (as :func:`load_graph` returns it) with the eager ``model`` on each of
    ``images`` (3, H, W), output by output.

    Args:
        tolerance (dict[str, (float, float)]): (rtol, atol) per output name, as
            :data:`GRAPH_TOLERANCE`; outputs it does not name (classes, image size) must be equal.

    Returns:
        dict: per image size "HxW", the largest difference per output.

    Raises:
        AssertionError: naming the image size and the output that is missing or differs.
    """
    report = {}
    for image in images:
        size = "x".join(map(str, image.shape[1:]))
        expected, actual = _named_outputs(model, image), graph(image)
        if set(actual) != set(expected):
            raise AssertionError(
                f"{size}: the graph returned {sorted(actual)}, not {sorted(expected)}."
            )
        report[size] = {}
        for name, e in expected.items():
            a = actual[name].to(e.dtype)
            rtol, atol = tolerance.get(name, (0.0, 0.0))
            # assert_close also fails, naming the output, when the shapes differ.
            torch.testing.assert_close(
                a, e, rtol=rtol, atol=atol, msg=lambda m: f"{size} image, {name}: {m}"
            )
            report[size][name] = (a.double() - e.double()).abs().max().item() if e.numel() else 0.0
    logger.info(f"Largest differences between graph and eager model: {json.dumps(report)}")
    return report


def _resized_copies(image):
    """``image`` (3, H, W) resized to (3H/4, 5W/4) and (5H/4, 7W/8): 96x160 and 160x112 from 128."""
    h, w = image.shape[1:]
    sizes = [(round(h * 3 / 4), round(w * 5 / 4)), (round(h * 5 / 4), round(w * 7 / 8))]
    return [
        F.interpolate(image[None], size=s, mode="bilinear", align_corners=False)[0] for s in sizes
    ]


@torch.no_grad()
def export_graph(cfg, output_dir, image, fmt):
    """
    Trace the model of ``cfg`` on ``image`` (3, H, W) into ``output_dir/model.ts`` or
    ``model.onnx`` (run with onnxruntime), check the written graph against the eager model on
    ``image`` and on two resized copies of it (other sizes than the traced one), and time both.

    Returns:
        dict: the path, output names, largest difference per input size and output, and median
        latencies; also written to ``output_dir/outputs.json``.
    """
    if fmt not in GRAPH_TOLERANCE:
        raise InputError(f"Unknown graph format {fmt!r}; use one of {sorted(GRAPH_TOLERANCE)}.")
    model = _load_model(cfg)
    os.makedirs(output_dir, exist_ok=True)
    path, names = trace_graph(model, image, fmt, output_dir)
    graph = load_graph(path, names)
    report = {
        "path": path,
        "format": fmt,
        "outputs": names,
        "max_abs_diff": check_graph(
            model, graph, [image, *_resized_copies(image)], GRAPH_TOLERANCE[fmt]
        ),
        "tolerance": {k: dict(zip(["rtol", "atol"], v)) for k, v in GRAPH_TOLERANCE[fmt].items()},
        "latency_s": {
            "eager": _median_time(lambda x: _named_outputs(model, x), image),
            fmt: _median_time(graph, image),
        },
    }
    with open(os.path.join(output_dir, "outputs.json"), "w") as f:
        json.dump(report, f, indent=2)
    logger.info(f"Wrote {path}: {json.dumps(report)}")
    return report


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
