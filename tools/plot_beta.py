#!/usr/bin/env python
"""
Draw the self-adjusting smooth L1 loss of a training run as the paper's Fig. 3 does: the running
mean and running variance of |prediction - target| and the control point beta of each box
coordinate (dx, dy, dw, dh) over the iterations (Sec. 3.2, Eq. 2).

    python3 tools/plot_beta.py output/synthetic_retinamask/metrics.json --output beta.png

SelfAdjustingSmoothL1Loss logs ``box_reg_{mean,var,beta}/{dx,dy,dw,dh}`` to the run's
metrics.json: each point is the median of the last 20 iterations, written every 20 iterations.
"""

import argparse
import os
import sys

from matplotlib.figure import Figure  # no pyplot: files only, no display

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from retinamask_d2.evaluation import read_metrics_json  # noqa: E402

COORDS = ("dx", "dy", "dw", "dh")
# (key in metrics.json, axis label)
PANELS = (
    ("mean", r"running mean $\mu_R$ of $|x|$"),
    ("var", r"running variance $\sigma_R^2$ of $|x|$"),
    ("beta", r"$\beta = $ clamp$(\mu_R - \sigma_R^2, \cdot, \hat\beta)$"),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="metrics.json of a training run")
    parser.add_argument("--output", default="self_adjusting_beta.png", help="PNG to write")
    parser.add_argument(
        "--beta-max", type=float, default=0.11,
        help="beta-hat, drawn as a dashed line (MODEL.RETINAMASK.BOX_REG_LOSS.BETA)",
    )  # fmt: skip
    parser.add_argument("--title", default=None, help="default: the run's directory")
    return parser.parse_args(argv)


def read_curves(path):
    """
    Returns:
        dict: ``{stat: {coord: (iterations, values)}}`` for stat in mean, var, beta, sorted by
        iteration. A resumed run writes some iterations twice; the last record wins.
    """
    points = {(stat, c): {} for stat, _ in PANELS for c in COORDS}
    for record in read_metrics_json(path):
        for (stat, coord), values in points.items():
            if f"box_reg_{stat}/{coord}" in record:
                values[record["iteration"]] = record[f"box_reg_{stat}/{coord}"]
    if not any(points.values()):
        raise ValueError(
            f"{path} has no box_reg_{{mean,var,beta}}/* values: the run did not train with"
            " MODEL.RETINAMASK.BOX_REG_LOSS.NAME SelfAdjustingSmoothL1Loss, or predates them."
        )
    curve = {key: tuple(zip(*sorted(values.items()))) or ((), ()) for key, values in points.items()}
    return {stat: {c: curve[stat, c] for c in COORDS} for stat, _ in PANELS}


def plot(curves, output, beta_max=None, title=None):
    fig = Figure(figsize=(7, 8))
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    for ax, (stat, label) in zip(axes, PANELS):
        for coord in COORDS:
            iterations, values = curves[stat][coord]
            ax.plot(iterations, values, label=coord, linewidth=1.2)
        if stat == "beta" and beta_max is not None:
            ax.axhline(beta_max, color="gray", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1.25 * beta_max)  # room for the label above the clamp bound
            ax.annotate(
                r"$\hat\beta$ = " + f"{beta_max:g}", (0.01, beta_max),
                xycoords=("axes fraction", "data"), va="bottom", color="gray",
            )  # fmt: skip
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(ncol=len(COORDS), loc="upper right")
    axes[-1].set_xlabel("iteration")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)


def main(args):
    run = os.path.basename(os.path.dirname(os.path.abspath(args.metrics)))
    default = f"Self-adjusting smooth L1, {run} (medians over 20 iterations)"
    title = default if args.title is None else args.title
    plot(read_curves(args.metrics), args.output, beta_max=args.beta_max, title=title)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(parse_args())
