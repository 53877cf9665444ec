#!/usr/bin/env python
"""
Measure RetinaMask against detectron2's RetinaNet in one run, on one machine, with the same
inputs and weights: FLOPs per image (fvcore), inference latency, training iteration time and peak
memory. On a shared machine the ratios to RetinaNet are the result, not the absolute times.

    python3 tools/benchmark.py --config-file configs/retinamask_R50_1x.yaml --output bench.json
    python3 tools/benchmark.py --config-file configs/synthetic/retinamask_synthetic.yaml \
        --weights output/synthetic/model_final.pth --dataset synthetic_shapes_val

Without --weights the models share one random initialization (frozen BatchNorm calibrated on
the first input) and the score threshold is 0, so the mask head runs on its maximum of 50.
"""

import argparse
import copy
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
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(512, 640),
        metavar=("H", "W"),
        help="image size of the generated inputs (without --dataset)",
    )
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
    cfg = retinamask_d2.get_retinamask_cfg(
        args.config_file, ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", *args.opts]
    )
    if not args.weights:
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.merge_from_list(VARIANTS[name])
    cfg.freeze()
    return cfg


@torch.no_grad()
def calibrate_frozen_bn(model, image):
    """
    Set every frozen BatchNorm's statistics to those of its input on ``image``. Without
    pretrained weights, identity statistics let activations grow through the residual blocks
    until every box is huge and NMS leaves a handful of detections.
    """

    def set_statistics(module, inputs):
        module.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(inputs[0].var(dim=(0, 2, 3)))

    handles = [
        m.register_forward_pre_hook(set_statistics)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
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
        images = [DatasetMapper(cfg, False)(copy.deepcopy(d)) for d in dicts[:n]]
        mapper = DatasetMapper(cfg, True)
        return images, [[mapper(copy.deepcopy(d)) for d in dicts[: args.batch_size]]]
    rng = np.random.default_rng(0)
    h, w = args.size
    images = [
        {"image": torch.as_tensor(rng.integers(0, 256, (3, h, w), dtype=np.uint8))}
        for _ in range(n)
    ]
    batch = []
    for image in images[: args.batch_size]:
        xy = rng.uniform(0, [w * 0.7, h * 0.7], size=(6, 2))
        wh = rng.uniform(16, [w * 0.3, h * 0.3], size=(6, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.as_tensor(boxes))
        inst.gt_classes = torch.as_tensor(rng.integers(0, cfg.MODEL.RETINANET.NUM_CLASSES, 6))
        inst.gt_masks = PolygonMasks([[box[[0, 1, 2, 1, 2, 3, 0, 3]]] for box in boxes])
        batch.append({"image": image["image"], "instances": inst})
    return images, [batch]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_flops(models, image):
    flops = {}
    for name, model in models.items():
        with torch.no_grad():
            analysis = FlopCountAnalysis(model.eval(), [image])
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            flops[name] = analysis.total()
    return flops


def _median_times(steps, inputs, args, iters):
    """
    Median seconds of ``steps[name](input)`` per name. The steps are interleaved, in an order
    that rotates every round, so that drift hits all alike and none always runs first.
    """
    times = {name: [] for name in steps}
    items = list(steps.items())
    for i in range(args.warmup + iters):
        k = i % len(items)
        for name, step in items[k:] + items[:k]:
            _sync(args.device)
            start = time.perf_counter()
            step(inputs[i % len(inputs)])
            _sync(args.device)
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
    """Peak memory of one model in a process of its own, so that peaks do not mix."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_memory, (args, name, mode))


def _peak_memory(args, name, mode):
    # Linux: writing 5 to clear_refs resets VmHWM, so that the peak excludes the imports.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
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
        "gflops": {name: flops / 1e9 for name, flops in count_flops(models, images[0]).items()},
        "latency_s": time_inference(models, images, args),
        "train_iter_s": time_training(models, batches, args),
    }
    results = {name: {} for name in models}
    for key, values in measured.items():
        for name, value in values.items():
            results[name].update({key: value, f"{key}_ratio": value / values[BASELINE]})
    with torch.no_grad():
        detections = len(models[MASKS].eval()([images[0]])[0]["instances"])
    # All detections are returned; the mask head runs on the top NUM_MASKS_TEST (0: all).
    num_masks = models[MASKS].num_masks_test
    results[MASKS]["detections"] = detections
    results[MASKS]["detections_with_masks"] = min(detections, num_masks or detections)
    for name in [] if args.no_memory else models:
        for mode in ("inference", "train"):
            for key, value in peak_memory(args, name, mode).items():
                results[name][f"{mode}_peak_{key}"] = value

    header = (
        f"{'model':<22}{'GFLOPs':>9}{'ratio':>8}{'latency ms':>12}{'ratio':>8}"
        f"{'train it s':>12}{'ratio':>8}{'peak RSS inf/train MiB':>26}"
    )
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        mem = "-"
        if not args.no_memory:
            mem = f"{r['inference_peak_cpu_rss_mib']:.0f} / {r['train_peak_cpu_rss_mib']:.0f}"
        print(
            f"{name:<22}{r['gflops']:>9.2f}{r['gflops_ratio']:>8.3f}"
            f"{r['latency_s'] * 1e3:>12.1f}{r['latency_s_ratio']:>8.3f}"
            f"{r['train_iter_s']:>12.3f}{r['train_iter_s_ratio']:>8.3f}{mem:>26}"
        )
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
