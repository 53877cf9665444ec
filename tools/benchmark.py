#!/usr/bin/env python
"""
Measure RetinaMask against detectron2's RetinaNet in one run, on one machine, with the same
inputs and weights: FLOPs per image (fvcore), inference latency, training iteration time and peak
memory. On a shared machine the ratios to RetinaNet are the result, not the absolute times.

    python3 tools/benchmark.py --config-file configs/retinamask_R50_1x.yaml --output bench.json
    python3 tools/benchmark.py --config-file configs/synthetic/retinamask_synthetic.yaml \
        --weights output/synthetic/model_final.pth --dataset synthetic_shapes_val

Without --weights the models share one random initialization whose frozen BatchNorm statistics
are calibrated on the first input (so activations have the scale of a trained network), and the
score threshold is 0: every image gives the full 100 detections and the mask head runs on its
maximum of 50.
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

BASELINE = "RetinaNet"
# name -> config overrides
VARIANTS = {
    BASELINE: ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.MASK_ON", False],
    "RetinaMask box-only": ["MODEL.MASK_ON", False],
    "RetinaMask masks": ["MODEL.MASK_ON", True],
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


def build_cfg(args, overrides):
    cfg = retinamask_d2.get_retinamask_cfg(
        args.config_file, ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", *args.opts]
    )
    if not args.weights:
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    cfg.merge_from_list(overrides)
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
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [
        m.register_forward_pre_hook(set_statistics)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    model.eval()
    model([image])
    for handle in handles:
        handle.remove()


def build_models(args, names=tuple(VARIANTS)):
    """The models named, with identical weights wherever they share a parameter."""
    torch.manual_seed(0)
    cfg = build_cfg(args, VARIANTS["RetinaMask masks"])
    reference = build_model(cfg)
    if args.weights:
        DetectionCheckpointer(reference).load(args.weights)
    else:
        calibrate_frozen_bn(reference, make_inputs(args, cfg)[0][0])
    state = reference.state_dict()
    del reference
    models = {}
    for name in names:
        model = build_model(build_cfg(args, VARIANTS[name]))
        model.load_state_dict(state, strict=False)
        models[name] = model
    return models


def make_inputs(args, cfg):
    """(inference inputs, training batches), both lists of detectron2 model inputs."""
    if args.dataset:
        dicts = DatasetCatalog.get(args.dataset)
        test_mapper = DatasetMapper(cfg, is_train=False)
        train_mapper = DatasetMapper(cfg, is_train=True)
        n = max(args.iters, args.batch_size)
        images = [test_mapper(copy.deepcopy(d)) for d in dicts[:n]]
        train = [train_mapper(copy.deepcopy(d)) for d in dicts[: args.batch_size]]
        return images, [train]
    rng = np.random.default_rng(0)
    h, w = args.size
    images = [
        {"image": torch.as_tensor(rng.integers(0, 256, (3, h, w), dtype=np.uint8))}
        for _ in range(max(args.iters, 1))
    ]
    train = []
    for image in images[: args.batch_size]:
        xy = rng.uniform(0, [w * 0.7, h * 0.7], size=(6, 2))
        wh = rng.uniform(16, [w * 0.3, h * 0.3], size=(6, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.as_tensor(boxes))
        inst.gt_classes = torch.as_tensor(rng.integers(0, cfg.MODEL.RETINANET.NUM_CLASSES, 6))
        inst.gt_masks = PolygonMasks(
            [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()]
        )
        train.append({"image": image["image"], "instances": inst})
    return images, [train]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rotated(models, i):
    """The models in an order that changes every round, so that none always runs first."""
    items = list(models.items())
    k = i % len(items)
    return items[k:] + items[:k]


def count_flops(models, image):
    flops = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, [image])
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            flops[name] = analysis.total()
    return flops


def time_inference(models, images, args):
    """Median seconds per image; models are interleaved so that drift hits all alike."""
    times = {name: [] for name in models}
    for model in models.values():
        model.eval()
    with torch.no_grad():
        for i in range(args.warmup + args.iters):
            image = images[i % len(images)]
            for name, model in _rotated(models, i):
                _sync(args.device)
                start = time.perf_counter()
                model([image])
                _sync(args.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _train_step(model, optimizer, batch):
    with EventStorage():
        losses = model(batch)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    return losses


def time_training(models, batches, args):
    """Median seconds per training iteration (forward, backward, SGD step), interleaved."""
    # lr 0 keeps every model at the same weights, so each iteration does the same work.
    optimizers = {
        name: torch.optim.SGD(m.parameters(), lr=0.0, momentum=0.9) for name, m in models.items()
    }
    times = {name: [] for name in models}
    for model in models.values():
        model.train()
    for i in range(args.warmup + args.train_iters):
        batch = batches[i % len(batches)]
        for name, model in _rotated(models, i):
            _sync(args.device)
            start = time.perf_counter()
            _train_step(model, optimizers[name], batch)
            _sync(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _reset_peak_rss():
    # Linux: writing 5 to clear_refs resets VmHWM, so that the peak excludes the imports.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_memory_worker(args, name, mode, queue):
    _reset_peak_rss()
    model = build_models(args, names=(name,))[name]
    cfg = build_cfg(args, VARIANTS[name])
    images, batches = make_inputs(args, cfg)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if mode == "inference":
        model.eval()
        with torch.no_grad():
            for image in images[:3]:
                model([image])
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        for _ in range(2):
            _train_step(model, optimizer, batches[0])
    result = {"cpu_rss_mib": _peak_rss_mib()}
    if args.device.startswith("cuda"):
        result["gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(result)


def peak_memory(args, name, mode):
    """Peak memory of one model in a process of its own, so that peaks do not mix."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_worker, args=(args, name, mode, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = build_models(args)
    cfg = build_cfg(args, VARIANTS["RetinaMask masks"])
    images, batches = make_inputs(args, cfg)
    image_hw = tuple(images[0]["image"].shape[1:])
    logger.info(
        f"{args.config_file} on {args.device}, {torch.get_num_threads()} threads, "
        f"images {image_hw}, weights: {args.weights or 'random, score threshold 0'}"
    )

    results = {name: {} for name in models}
    for name, value in count_flops(models, images[0]).items():
        results[name]["gflops"] = value / 1e9
    with torch.no_grad():
        mask_model = models["RetinaMask masks"].eval()
        num_detections = len(mask_model([images[0]])[0]["instances"])
        # All detections are returned; the mask head runs on the top NUM_MASKS_TEST.
        num_masks = mask_model.num_masks_test
        results["RetinaMask masks"]["detections"] = num_detections
        results["RetinaMask masks"]["detections_with_masks"] = (
            min(num_detections, num_masks) if num_masks > 0 else num_detections
        )
    for name, value in time_inference(models, images, args).items():
        results[name]["latency_s"] = value
    for name, value in time_training(models, batches, args).items():
        results[name]["train_iter_s"] = value
    if not args.no_memory:
        for name in models:
            for mode in ("inference", "train"):
                for key, value in peak_memory(args, name, mode).items():
                    results[name][f"{mode}_peak_{key}"] = value

    base = results[BASELINE]
    for name, r in results.items():
        for key in ("gflops", "latency_s", "train_iter_s"):
            r[f"{key}_ratio"] = r[key] / base[key]

    header = (
        f"{'model':<22}{'GFLOPs':>9}{'ratio':>8}{'latency ms':>12}{'ratio':>8}"
        f"{'train it s':>12}{'ratio':>8}{'peak RSS inf/train MiB':>26}"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        mem = (
            f"{r['inference_peak_cpu_rss_mib']:.0f} / {r['train_peak_cpu_rss_mib']:.0f}"
            if not args.no_memory
            else "-"
        )
        lines.append(
            f"{name:<22}{r['gflops']:>9.2f}{r['gflops_ratio']:>8.3f}"
            f"{r['latency_s'] * 1e3:>12.1f}{r['latency_s_ratio']:>8.3f}"
            f"{r['train_iter_s']:>12.3f}{r['train_iter_s_ratio']:>8.3f}{mem:>26}"
        )
    print("\n".join(lines))
    report = {
        "config_file": args.config_file,
        "weights": args.weights,
        "dataset": args.dataset,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "image_hw": image_hw,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "train_iters": args.train_iters,
        "results": results,
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(parse_args())
