#!/usr/bin/env python
"""
Export a trained RetinaMask for deployment.

    # A checkpoint and config for detectron2's stock RetinaNet, which plain detectron2 builds;
    # refused, with nothing written, for configs whose network needs retinamask_d2 (the COCO and
    # original configs: the reference's backbone and rounded anchors)
    python tools/export_model.py --format box-only --config-file CFG --output DIR MODEL.WEIGHTS W
    # A traced graph, with masks or (--no-masks) box-only, for any config
    python tools/export_model.py --format torchscript --config-file CFG --output DIR MODEL.WEIGHTS W
    python tools/export_model.py --format onnx --no-masks --config-file CFG --output DIR \\
        MODEL.WEIGHTS W

The graphs take one image tensor (3, H, W) of any size, resized as DefaultPredictor does; their
outputs, listed in DIR/outputs.json, are the detections before scaling to the original image,
masks as 28x28 RoI probabilities. Each graph is checked against the eager model on a sample
image and on two resized copies of it.
"""

import argparse

from detectron2.utils.logger import setup_logger

from retinamask_d2 import InputError, get_retinamask_cfg
from retinamask_d2.engine import one_line_errors
from retinamask_d2.export import export_box_only, export_graph, sample_image


def get_parser():
    parser = argparse.ArgumentParser(description="Export a trained RetinaMask for deployment.")
    parser.add_argument("--format", required=True, choices=["box-only", "torchscript", "onnx"])
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--no-masks", action="store_true", help="trace the box-only detector")
    parser.add_argument("--sample-image", default="", help="default: the first test image")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE")
    return parser


def main(args):
    # The graphs are traced on the CPU.
    cfg = get_retinamask_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", "cpu"])
    if not cfg.MODEL.WEIGHTS:
        raise InputError("Give the weights to export: MODEL.WEIGHTS path/to/model_final.pth")
    cfg.MODEL.MASK_ON = cfg.MODEL.MASK_ON and not args.no_masks
    cfg.freeze()
    if args.format == "box-only":
        export_box_only(cfg, args.output)
    else:
        export_graph(cfg, args.output, sample_image(cfg, args.sample_image), args.format)


if __name__ == "__main__":
    setup_logger(name="retinamask_d2")
    setup_logger(name="detectron2")
    with one_line_errors():
        main(get_parser().parse_args())
