#!/usr/bin/env python
"""
Convert a checkpoint of the authors' RetinaMask (chengyangfu/retinamask) into a detectron2
checkpoint for the matching config in configs/original/:

    python3 tools/convert_original.py --config-file configs/original/retinamask_R50.yaml \
        retinanet_mask_R-50-FPN_2x_adjust_std011_ms_model.pth retinamask_R50.pth

The output loads with detectron2's DetectionCheckpointer (MODEL.WEIGHTS). On any problem the
script prints one line naming it, exits with status 1 and writes nothing.
"""

import argparse
import sys

from retinamask_d2 import get_retinamask_cfg
from retinamask_d2.original import convert_original_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="a configs/original/*.yaml file")
    parser.add_argument("original", help="checkpoint written by the authors' code")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE")
    args = parser.parse_args(argv)

    try:
        cfg = get_retinamask_cfg(args.config_file, args.opts)
        summary = convert_original_file(cfg, args.original, args.output)
    except (OSError, KeyError, ValueError) as e:  # InputError is a ValueError
        print(f"convert_original.py: error: {e}", file=sys.stderr)
        return 1

    print(
        f"Converted {summary['converted']} tensors ({summary['parameters']:,} values) from "
        f"{args.original} to {args.output}."
    )
    for key, reason in summary["dropped"].items():
        print(f"  dropped {key}: {reason}")
    for key in summary["not_in_checkpoint"]:
        print(f"  not in the checkpoint, starts from its initial value: {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
