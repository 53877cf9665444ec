"""
Run a trained model on images and save each with its detections drawn: boxes, class names,
scores and masks.

    python -m retinamask_d2.demo --config-file configs/synthetic/retinamask_synthetic.yaml \\
        --input datasets/synthetic_shapes/val/images --output output/demo --scale 3 \\
        MODEL.WEIGHTS output/synthetic_retinamask/model_final.pth MODEL.DEVICE cpu

``--input`` is an image file or a folder of them; every result is written as
``<output>/<input name>.png``. Class names come from the metadata of the config's first test
dataset (``DATASETS.TEST``), else its first training dataset.
"""
import argparse
import logging
import os
import time
from typing import List, Optional

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

from .config import add_retinamask_config

__all__ = ["main"]

# Named explicitly: under `python -m retinamask_d2.demo` __name__ is "__main__".
logger = logging.getLogger("retinamask_d2.demo")

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retinamask_d2.demo",
        description="Draw the detections of a trained RetinaMask (boxes, classes, scores, "
        "masks) on images.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config")
    parser.add_argument(
        "--input", required=True, metavar="PATH", help="an image file, or a folder of images"
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder the drawn images are written to"
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of the detections drawn",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="resize factor of the drawn images; small images read better enlarged",
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS W MODEL.DEVICE cpu",
    )
    return parser


def setup_cfg(args):
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(
            f"Config file {args.config_file!r} (--config-file) does not exist. Pass the config "
            "the weights were trained with, e.g. configs/synthetic/retinamask_synthetic.yaml."
        )
    cfg = get_cfg()
    add_retinamask_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # Only detections above the threshold are drawn; filtering in the model also keeps the
    # top-50 mask budget (MODEL.RETINAMASK.NUM_MASKS_TEST) for them.
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()

    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError(
            f"{args.config_file} sets no MODEL.WEIGHTS, so the model would be untrained. Add "
            "`MODEL.WEIGHTS path/to/model_final.pth` (written by train_net.py into its "
            "OUTPUT_DIR) to the command line."
        )
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"MODEL.WEIGHTS {weights!r} does not exist. Pass the model_final.pth (or "
            "model_XXXXXXX.pth) that train_net.py wrote into its OUTPUT_DIR."
        )
    return cfg


def list_images(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path!r} is neither an image file nor a folder.")
    images = sorted(
        os.path.join(path, f)
        for f in os.listdir(path)
        if f.lower().endswith(_IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))
    )
    if not images:
        raise FileNotFoundError(
            f"No images in folder {path!r} (looked for {', '.join(_IMAGE_EXTENSIONS)})."
        )
    return images


def _metadata(cfg):
    names = list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN)
    # An empty catalogue entry makes Visualizer print class ids instead of names.
    return MetadataCatalog.get(names[0] if names else "__unused")


def main(argv: Optional[List[str]] = None) -> List[str]:
    """
    Returns:
        list[str]: the files written.
    """
    args = get_parser().parse_args(argv)
    setup_logger(name="retinamask_d2")
    cfg = setup_cfg(args)
    images = list_images(args.input)
    predictor = DefaultPredictor(cfg)
    metadata = _metadata(cfg)
    os.makedirs(args.output, exist_ok=True)

    written = []
    for path in images:
        try:
            image = read_image(path, format="BGR")
        except Exception as e:
            raise ValueError(f"Cannot read image {path}: {e}. Remove or replace the file.") from e
        start = time.perf_counter()
        instances = predictor(image)["instances"].to("cpu")
        elapsed = time.perf_counter() - start
        visualizer = Visualizer(image[:, :, ::-1], metadata, scale=args.scale)
        drawn = visualizer.draw_instance_predictions(instances)
        out_file = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        drawn.save(out_file)
        written.append(out_file)
        logger.info(f"{path}: {len(instances)} instances in {elapsed:.2f}s -> {out_file}")
    return written


if __name__ == "__main__":
    main()
