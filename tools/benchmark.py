#!/usr/bin/env python
"""
Measure RetinaMask against detectron2's RetinaNet in one run, on one machine, with the same
inputs and weights: FLOPs per image (fvcore), inference latency, training iteration time and peak
memory. On a shared machine the ratios to RetinaNet are the result, not the absolute times.

    python3 tools/benchmark.py --config-file configs/retinamask_R50_1x.yaml --output bench.json

Without --weights the models share one random initialization (frozen BatchNorm calibrated on
the first input) and the score threshold is 0, so the mask head runs on its maximum of 50.
--dataset takes the inputs from a registered dataset instead of random images of --size.
"""

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from functools import partial

import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import retinamask_d2  # noqa: E402  (registers RetinaMask and the synthetic datasets)

logger = logging.getLogger("retinamask_d2.benchmark")

BASELINE, MASKS = "RetinaNet", "RetinaMask masks"
# name -> config overrides
VARIANTS = {
    BASELINE: ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.MASK_ON", False],
    "RetinaMask box-only": ["MODEL.MASK_ON", False],
    MASKS: ["MODEL.MASK_ON", True],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="configs/retinamask_R50_1x.yaml")
    parser.add_argument("--weights", default="", help="checkpoint loaded into every model")
    parser.add_argument("--dataset", default="", help="a registered dataset to take inputs from")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 640), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=2, help="images per training step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="timed repetitions per model")
    parser.add_argument("--train-iters", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory runs")
    parser.add_argument("--output", default="", help="write the results as JSON here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    return parser.parse_args(argv)


def build_cfg(args, name):
    score = [] if args.weights else ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0]
    opts = ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", *args.opts, *score, *VARIANTS[name]]
    return retinamask_d2.get_retinamask_cfg(args.config_file, opts)


@torch.no_grad()
def calibrate_frozen_bn(model, image):
    """
    Set every frozen BatchNorm's statistics to those of its input on ``image``: identity
    statistics let random activations grow until NMS leaves a handful of huge boxes.
    """

    def set_statistics(module, inputs):
        module.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(inputs[0].var(dim=(0, 2, 3)))

    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(set_statistics) for m in norms]
    model.eval()([image])
    for handle in handles:
        handle.remove()


def build_models(args, names=tuple(VARIANTS)):
    """The models named, with identical weights wherever they share a parameter."""
    torch.manual_seed(0)
    reference = build_model(build_cfg(args, MASKS))
    if args.weights:
        DetectionCheckpointer(reference).load(args.weights)
    else:
        calibrate_frozen_bn(reference, make_inputs(args, build_cfg(args, MASKS))[0][0])
    state = reference.state_dict()
    del reference
    models = {name: build_model(build_cfg(args, name)) for name in names}
    for model in models.values():
        model.load_state_dict(state, strict=False)
    return models


def make_inputs(args, cfg):
    """(inference inputs, training batches), both lists of detectron2 model inputs."""
    n = max(args.iters, args.batch_size, 1)
    if args.dataset:
        dicts = DatasetCatalog.get(args.dataset)
        images = [DatasetMapper(cfg, False)(d) for d in dicts[:n]]  # the mappers copy each dict
        mapper = DatasetMapper(cfg, True)
        return images, [[mapper(d) for d in dicts[: args.batch_size]]]
    rng = np.random.default_rng(0)
    h, w = args.size
    images = [{"image": torch.as_tensor(x)} for x in rng.integers(0, 256, (n, 3, h, w), np.uint8)]
    batch = []
    for image in images[: args.batch_size]:
        xy = rng.uniform(0, [w * 0.7, h * 0.7], size=(6, 2))
        wh = rng.uniform(16, [w * 0.3, h * 0.3], size=(6, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        masks = PolygonMasks([[box[[0, 1, 2, 1, 2, 3, 0, 3]]] for box in boxes])
        inst = Instances((h, w), gt_boxes=Boxes(torch.as_tensor(boxes)), gt_masks=masks)
        inst.gt_classes = torch.as_tensor(rng.integers(0, cfg.MODEL.RETINANET.NUM_CLASSES, 6))
        batch.append({"image": image["image"], "instances": inst})
    return images, [batch]


@torch.no_grad()
def count_flops(model, image):
    analysis = FlopCountAnalysis(model.eval(), [image])
    return analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()


def _median_times(steps, inputs, args, iters):
    """
    Median seconds of ``steps[name](input)`` per name. The steps are interleaved, in an order
    that rotates every round, so that drift hits all alike and none always runs first.
    """
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    times = {name: [] for name in steps}
    items = list(steps.items())
    for i in range(args.warmup + iters):
        k = i % len(items)
        for name, step in items[k:] + items[:k]:
            sync()
            start = time.perf_counter()
            step(inputs[i % len(inputs)])
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def time_inference(models, images, args):
    """Median seconds per image."""
    steps = {name: model.eval() for name, model in models.items()}
    return _median_times(steps, [[image] for image in images], args, args.iters)


def _train_step(model, optimizer, batch):
    with EventStorage():
        losses = model(batch)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()


def time_training(models, batches, args):
    """Median seconds per training iteration (forward, backward, SGD step)."""
    # lr 0 keeps every model at the same weights, so each iteration does the same work.
    steps = {
        name: partial(_train_step, m.train(), torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9))
        for name, m in models.items()
    }
    return _median_times(steps, batches, args, args.train_iters)


def peak_memory(args, name, mode):
    """Peak memory of one model, run in a fresh process: ``{"cpu_rss_mib", "gpu_mib"}``."""
    # Linux: writing 5 to clear_refs resets VmHWM, so that the peak excludes the imports.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    model = build_models(args, names=(name,))[name]
    images, batches = make_inputs(args, build_cfg(args, name))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if mode == "inference":
        with torch.no_grad():
            for image in images[:3]:
                model.eval()([image])
    else:
        optimizer = torch.optim.SGD(model.train().parameters(), lr=0.0)
        for _ in range(2):
            _train_step(model, optimizer, batches[0])
    try:
        with open("/proc/self/status") as f:
            peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"cpu_rss_mib": peak_kib / 1024}
    if args.device.startswith("cuda"):
        result["gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = build_models(args)
    images, batches = make_inputs(args, build_cfg(args, MASKS))
    image_hw = tuple(images[0]["image"].shape[1:])
    logger.info(
        f"{args.config_file} on {args.device}, {torch.get_num_threads()} threads, "
        f"images {image_hw}, weights: {args.weights or 'random, score threshold 0'}"
    )

    measured = {
        "gflops": {name: count_flops(model, images[0]) / 1e9 for name, model in models.items()},
        "latency_s": time_inference(models, images, args),
        "train_iter_s": time_training(models, batches, args),
    }
    if not args.no_memory:
        # One process per model and mode (maxtasksperchild=1), so that peaks do not mix.
        with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for mode in ("inference", "train"):
                peaks = {name: pool.apply(peak_memory, (args, name, mode)) for name in models}
                for key in peaks[BASELINE]:
                    measured[f"{mode}_peak_{key}"] = {n: p[key] for n, p in peaks.items()}
    results = {name: {} for name in models}
    for key, values in measured.items():
        for name, value in values.items():
            results[name].update({key: value, f"{key}_ratio": value / values[BASELINE]})
    with torch.no_grad():
        detections = len(models[MASKS].eval()([images[0]])[0]["instances"])
    # All detections are returned; the mask head runs on the top NUM_MASKS_TEST (0: all).
    num_masks = models[MASKS].num_masks_test or detections
    results[MASKS].update(detections=detections, detections_with_masks=min(detections, num_masks))

    # One row per measure, one column per model: value (ratio to RetinaNet).
    print(f"{'':<28}" + "".join(f"{name:>22}" for name in models))
    for key, values in measured.items():
        cells = [f"{v:.4g} ({v / values[BASELINE]:.3f})" for v in values.values()]
        print(f"{key:<28}" + "".join(f"{cell:>22}" for cell in cells))
    keys = ("config_file", "weights", "dataset", "device", "batch_size", "iters", "train_iters")
    report = {key: getattr(args, key) for key in keys}
    report.update(threads=torch.get_num_threads(), torch=torch.__version__, image_hw=image_hw)
    report["results"] = results
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(parse_args())
