#!/usr/bin/env python
"""
Generate the synthetic_shapes datasets (train: 300 images, val: 50) once, before training:

    python tools/prepare_synthetic.py                # under $DETECTRON2_DATASETS, or ./datasets
    python tools/prepare_synthetic.py --root /data   # then train with DETECTRON2_DATASETS=/data

A split that already exists is kept.
"""

import argparse
import os
import sys

from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from retinamask_d2.config import InputError  # noqa: E402
from retinamask_d2.data import ensure_synthetic_dataset  # noqa: E402
from retinamask_d2.data.synthetic import SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="datasets root (default: $DETECTRON2_DATASETS or datasets)")
    args = parser.parse_args(argv)
    setup_logger(name="retinamask_d2")  # generation progress
    try:
        for split in SYNTHETIC_SHAPES_DEFAULT_NUM_IMAGES:
            json_file, _ = ensure_synthetic_dataset(split, args.root)
            print(f"synthetic_shapes_{split}: {json_file}")
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
