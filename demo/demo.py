#!/usr/bin/env python
"""
Draw the detections of a trained RetinaMask (boxes, classes, scores, masks) on images.

    python demo/demo.py --config-file configs/synthetic/retinamask_synthetic.yaml \\
        --input datasets/synthetic_shapes/val/images --output output/demo --scale 3 \\
        MODEL.WEIGHTS output/synthetic_retinamask/model_final.pth MODEL.DEVICE cpu

``--input`` is an image file or a folder of them; each result is written as
``<output>/<input name>.png``. Class names come from the config's first test dataset.
Unreadable images are reported and skipped; the exit status is non-zero if none was drawn.
"""

import argparse
import logging
import os
import time

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

from retinamask_d2 import InputError, Predictor, build_test_resize, get_retinamask_cfg
from retinamask_d2.checkpoint import AtomicDetectionCheckpointer
from retinamask_d2.engine import one_line_errors
from retinamask_d2.visualization import draw_instances, remove_overlaps

logger = logging.getLogger("retinamask_d2.demo")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", required=True, help="an image file, or a folder of images")
    parser.add_argument("--output", required=True, help="folder the drawn images go to")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument(
        "--overlap-threshold", type=float, default=0.5,
        help="of detections overlapping with a higher IoU, whatever their class, draw the best",
    )  # fmt: skip
    parser.add_argument("--scale", type=float, default=1.0, help="enlarge small images")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config options")
    return parser


def setup_cfg(args):
    cfg = get_retinamask_cfg(args.config_file, args.opts)
    # Filtering in the model keeps the mask budget (NUM_MASKS_TEST) for the detections drawn.
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        raise InputError(
            f"{args.config_file} sets no MODEL.WEIGHTS, so the model would be untrained: add "
            "`MODEL.WEIGHTS path/to/model_final.pth` (train_net.py writes it to OUTPUT_DIR)."
        )
    return cfg


def list_images(path):
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"--input {path!r} is neither an image file nor a folder: fix the path.")
    images = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
    if not images:
        raise InputError(f"--input folder {path!r} is empty: pass a folder of images.")
    return images


def main(args):
    cfg = setup_cfg(args)
    images = list_images(args.input)
    # The demo resizes each image itself, once (the reference's resize is not idempotent), and
    # predicts on the image as the model sees it: pasted masks then take bounded memory.
    resize = build_test_resize(cfg)
    # Weights loaded by this checkpointer rather than Predictor's: it names a bad file.
    unresized = cfg.clone()
    unresized.defrost()
    unresized.merge_from_list(["MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", 0])
    predictor = Predictor(unresized)
    AtomicDetectionCheckpointer(predictor.model).load(cfg.MODEL.WEIGHTS)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    os.makedirs(args.output, exist_ok=True)
    written = 0
    for path in images:
        try:
            image = read_image(path, format="BGR")
        except Exception as e:
            logger.warning(f"Skipped {path}: not a readable image ({e}).")
            continue
        image = resize.get_transform(image).apply_image(image)
        start = time.perf_counter()
        instances = predictor(image)["instances"].to("cpu")
        instances = remove_overlaps(instances, args.overlap_threshold)
        elapsed = time.perf_counter() - start
        out_file = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        draw_instances(image, instances, metadata, args.scale).save(out_file)
        written += 1
        logger.info(f"{path}: {len(instances)} instances in {elapsed:.2f}s -> {out_file}")
    if not written:
        raise InputError(f"None of the {len(images)} input file(s) is a readable image.")


if __name__ == "__main__":
    setup_logger(name="retinamask_d2")
    with one_line_errors():
        main(get_parser().parse_args())
