#!/usr/bin/env python
"""
Ablation of RetinaMask's three training changes on the synthetic shapes dataset, a miniature of
the paper's Tables 1-3: detectron2's RetinaNet, then RetinaMask adding best matching (Table 1),
the self-adjusting smooth L1 loss (Table 2) and the mask head (Table 3), one at a time. A last
row trains the full RetinaMask in detectron2's box-delta units rather than the reference code's.

    python3 tools/ablation.py
    python3 tools/ablation.py --variants match0.0+fixed retinamask --seeds 0 --max-iter 300
    python3 tools/ablation.py --variants retinamask retinamask-d2units   # the two unit systems
    python3 tools/ablation.py --collect-only          # table and JSON from the finished runs

Every run is ``train_net.py`` in a subprocess with the same data, seed and schedule for every
variant; the schedule of the synthetic config is scaled to ``--max-iter``. A run is
``<output>/<variant>/seed<s>``; one that already holds its final evaluation, from the same
command and merged config, is skipped, so an interrupted ablation resumes where it stopped.
The table gives mean +- sample std over seeds, and for each RetinaMask variant the change of box
AP from the row above it, paired by seed (same initialization and image order), which is less
noisy than the difference of the means. Results go to ``<output>/results.json``.
"""

import argparse
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import OrderedDict

from detectron2.utils.logger import setup_logger

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
import retinamask_d2  # noqa: E402  (add_retinamask_config; registers the synthetic datasets)

logger = logging.getLogger("retinamask_d2.ablation")

RETINAMASK_CONFIG = "configs/synthetic/retinamask_synthetic.yaml"
RETINANET_CONFIG = "configs/synthetic/retinanet_synthetic.yaml"
THIN_CLASS = "bar"

# name -> (which config, overrides). Each RetinaMask row of Tables 1-3 changes one thing from
# the row above; the last row changes the units of the full RetinaMask.
VARIANTS = OrderedDict(
    [
        ("retinanet", ("retinanet", [])),
        (
            "match0.5+fixed",
            (
                "retinamask",
                [
                    "MODEL.MASK_ON", "False",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.NAME", "BestMatchMatcher",
                    # A best match must beat the foreground threshold itself: plain RetinaNet
                    # matching, without detectron2's low-quality matches.
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD", "0.5",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.NAME", "SmoothL1Loss",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.BETA", "0.11",
                ],
            ),
        ),
        (
            "match0.0+fixed",
            (
                "retinamask",
                [
                    "MODEL.MASK_ON", "False",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.NAME", "BestMatchMatcher",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD", "0.0",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.NAME", "SmoothL1Loss",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.BETA", "0.11",
                ],
            ),
        ),
        (
            "match0.0+selfadj",
            (
                "retinamask",
                [
                    "MODEL.MASK_ON", "False",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.NAME", "BestMatchMatcher",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD", "0.0",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.NAME", "SelfAdjustingSmoothL1Loss",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.BETA", "0.11",
                ],
            ),
        ),
        (
            "retinamask",
            (
                "retinamask",
                [
                    "MODEL.MASK_ON", "True",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.NAME", "BestMatchMatcher",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD", "0.0",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.NAME", "SelfAdjustingSmoothL1Loss",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.BETA", "0.11",
                ],
            ),
        ),
        # The full RetinaMask again, in detectron2's units instead of the reference code's
        # (the config's): box deltas unweighted and the box loss not divided by 4, so the same
        # beta-hat 0.11 is a 10x (dx, dy) and 5x (dw, dh) larger control point.
        (
            "retinamask-d2units",
            (
                "retinamask",
                [
                    "MODEL.MASK_ON", "True",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.NAME", "BestMatchMatcher",
                    "MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD", "0.0",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.NAME", "SelfAdjustingSmoothL1Loss",
                    "MODEL.RETINAMASK.BOX_REG_LOSS.BETA", "0.11",
                    "MODEL.RETINANET.BBOX_REG_WEIGHTS", "(1.0, 1.0, 1.0, 1.0)",
                    "MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT", "1.0",
                ],
            ),
        ),
    ]
)  # fmt: skip

# The paper's numbers for the same step on COCO minival, ResNet-50-FPN, 1x schedule.
PAPER_COCO = {
    "retinanet": {"source": "not ablated in Tables 1-3 (Table 4: 35.7 test-dev, from [25])"},
    "match0.5+fixed": {"source": "Table 1, threshold 0.5", "box_AP": 35.5},
    "match0.0+fixed": {"source": "Table 1, threshold 0.0 = Table 2, fixed beta 0.11",
                       "box_AP": 36.2},
    "match0.0+selfadj": {"source": "Table 2, self-adjusting beta <= 0.11", "box_AP": 36.6},
    "retinamask": {"source": "Table 3, P3-P5 1x", "box_AP": 36.9, "mask_AP": 32.7},
    "retinamask-d2units": {"source": "not in the paper, which trains in the reference units"},
}  # fmt: skip

# Columns of the table and the JSON summary: name -> key in detectron2's flattened results.
METRICS = OrderedDict(
    [
        ("box_AP", "bbox/AP"),
        ("box_AP50", "bbox/AP50"),
        ("box_AP75", "bbox/AP75"),
        ("box_AP_" + THIN_CLASS, "bbox/AP-" + THIN_CLASS),
        ("mask_AP", "segm/AP"),
        ("mask_AP50", "segm/AP50"),
        ("mask_AP_" + THIN_CLASS, "segm/AP-" + THIN_CLASS),
    ]
)

# Keys that are allowed to differ between the RetinaNet and the RetinaMask config: what makes
# them different models. Anything else (data, input, backbone, anchors, schedule) must agree,
# or the first row of the table would not be a controlled comparison.
_ARCHITECTURE_KEYS = (
    "MODEL.META_ARCHITECTURE",
    "MODEL.MASK_ON",
    "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA",
    # detectron2's RetinaNet keeps its own box-delta units (see retinanet_synthetic.yaml).
    "MODEL.RETINANET.BBOX_REG_WEIGHTS",
    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE",
    "MODEL.RETINAMASK.",
    "MODEL.ROI_MASK_HEAD.",
    "OUTPUT_DIR",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--max-iter", type=int, default=400,
        help="iterations of every run; SOLVER.STEPS and WARMUP_ITERS are scaled along",
    )  # fmt: skip
    parser.add_argument("--output", default="output/ablation")
    parser.add_argument("--config-file", default=RETINAMASK_CONFIG, help="RetinaMask variants")
    parser.add_argument("--retinanet-config", default=RETINANET_CONFIG, help="the RetinaNet row")
    parser.add_argument(
        "--num-threads", type=int, default=1,
        help="intra-op threads per run (OMP/MKL); on a shared CPU more threads than free cores "
        "make every step several times slower",
    )  # fmt: skip
    parser.add_argument("--collect-only", action="store_true", help="train nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides for every run, after the variant's own",
    )  # fmt: skip
    return parser.parse_args(argv)


def load_cfg(config_file, opts=()):
    return retinamask_d2.get_retinamask_cfg(config_file, opts)


def _flatten(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def config_differences(cfg_a, cfg_b):
    """
    Keys, outside what distinguishes RetinaNet from RetinaMask, whose values differ between two
    merged configs: ``{key: (value_a, value_b)}``.
    """
    a, b = _flatten(cfg_a), _flatten(cfg_b)
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(_ARCHITECTURE_KEYS)
    }


def scaled_schedule(cfg, max_iter):
    """
    The config's LR schedule shrunk (or stretched) to ``max_iter`` iterations: LR steps and
    warmup keep their fraction of the run, so every variant sees the same curve.

    Returns:
        list: config overrides for SOLVER.
    """
    base = cfg.SOLVER.MAX_ITER
    steps = tuple(max(1, min(max_iter - 1, round(s * max_iter / base))) for s in cfg.SOLVER.STEPS)
    warmup = max(1, round(cfg.SOLVER.WARMUP_ITERS * max_iter / base))
    return [
        "SOLVER.MAX_ITER", max_iter,
        "SOLVER.STEPS", steps,
        "SOLVER.WARMUP_ITERS", warmup,
        # Only model_final.pth: 15 runs of intermediate checkpoints are disk, not results.
        "SOLVER.CHECKPOINT_PERIOD", max_iter,
        # Evaluate once, after the last iteration (EvalHook.after_train).
        "TEST.EVAL_PERIOD", 0,
    ]  # fmt: skip


def run_dir(output, variant, seed):
    return os.path.join(output, variant, f"seed{seed}")


def train_net_args(args, variant, seed, schedule):
    """Arguments of train_net.py (after the script) for one run; every value a string."""
    which, overrides = VARIANTS[variant]
    config_file = args.retinanet_config if which == "retinanet" else args.config_file
    opts = [
        "MODEL.DEVICE", "cpu",
        "SEED", seed,
        "OUTPUT_DIR", run_dir(args.output, variant, seed),
        *schedule,
        *overrides,
        *args.opts,
    ]  # fmt: skip
    return ["--config-file", config_file, "--num-gpus", "1", *[str(x) for x in opts]]


def run_stamp(cmd_args):
    """
    What identifies a run: its train_net.py arguments and a hash of the config they merge to,
    which changes when a YAML file (or its _BASE_) is edited between two calls.
    """
    config_file, opts = cmd_args[1], cmd_args[4:]
    merged = load_cfg(config_file, opts).dump()
    return {
        "train_net_args": cmd_args,
        "config_sha256": hashlib.sha256(merged.encode()).hexdigest(),
    }


def read_final_metrics(directory):
    """
    The evaluation results train_net.py stored in ``<directory>/metrics.json``: EvalHook puts
    detectron2's flattened results ("bbox/AP", "bbox/AP-bar", "segm/AP", ...) into the event
    storage and the JSONWriter appends them as one line per iteration.

    Returns:
        dict or None: the last line that has "bbox/AP", None if there is none.
    """
    path = os.path.join(directory, "metrics.json")
    if not os.path.isfile(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if "bbox/AP" in record:
                found = record
    return found


def pick_metrics(record):
    """The table's metrics from a metrics.json record, in AP points (0-100); NaN becomes None."""
    out = {}
    for name, key in METRICS.items():
        value = record.get(key)
        if value is not None and not math.isnan(value):
            out[name] = float(value)
    return out


def summarize(runs, variants):
    """
    Mean, sample std and values over seeds for every variant and metric, plus the box AP change
    from the previous variant, paired by seed.

    Args:
        runs (list[dict]): ``{"variant", "seed", "metrics"}`` of finished runs.
        variants (list[str]): in table order.
    """
    by_variant = {v: {r["seed"]: r["metrics"] for r in runs if r["variant"] == v} for v in variants}
    summary = OrderedDict()
    previous = None
    for variant in variants:
        seeds = sorted(by_variant[variant])
        entry = OrderedDict(seeds=seeds)
        for name in METRICS:
            values = [by_variant[variant][s][name] for s in seeds if name in by_variant[variant][s]]
            if values:
                entry[name] = _stats(values)
        if previous is not None:
            common = [s for s in seeds if s in by_variant[previous]]
            deltas = [
                by_variant[variant][s]["box_AP"] - by_variant[previous][s]["box_AP"] for s in common
            ]
            if deltas:
                entry["box_AP_delta"] = dict(_stats(deltas), versus=previous)
        summary[variant] = entry
        previous = variant
    return summary


def _stats(values):
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def _fmt(stats, signed=False):
    if stats is None:
        return "-"
    mean = f"{stats['mean']:+.1f}" if signed else f"{stats['mean']:.1f}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std']:.1f}"


def format_table(summary):
    columns = [
        ("box AP", "box_AP"), ("AP50", "box_AP50"), ("AP75", "box_AP75"),
        (f"AP-{THIN_CLASS}", f"box_AP_{THIN_CLASS}"), ("mask AP", "mask_AP"),
        (f"mask AP-{THIN_CLASS}", f"mask_AP_{THIN_CLASS}"),
    ]  # fmt: skip
    header = ["variant", "seeds", *[c for c, _ in columns], "Δ box AP (paired)", "paper, COCO"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, entry in summary.items():
        paper = PAPER_COCO[variant]
        ref = "/".join(f"{paper[k]}" for k in ("box_AP", "mask_AP") if k in paper) or "-"
        row = [variant, str(len(entry["seeds"]))]
        row += [_fmt(entry.get(key)) for _, key in columns]
        row += [_fmt(entry.get("box_AP_delta"), signed=True), ref]
        lines.append("| " + " | ".join(row) + " |")
    notes = ["", "Mean ± sample std over seeds, COCO-style AP in points on synthetic_shapes_val."]
    notes.append(
        "Δ box AP: per seed, this row minus the row above (same initialization and image order)."
    )
    notes.append("Paper column: box / mask AP on COCO minival, R-50-FPN, 1x schedule:")
    notes += [f"  {v}: {PAPER_COCO[v]['source']}" for v in summary]
    return "\n".join(lines + notes)


def run_one(args, variant, seed, schedule):
    """
    Train and evaluate one variant and seed unless its directory already holds the final
    evaluation of the same command.

    Returns:
        dict: the run's record for results.json.
    """
    directory = run_dir(args.output, variant, seed)
    cmd_args = train_net_args(args, variant, seed, schedule)
    stamp = run_stamp(cmd_args)
    stamp_path = os.path.join(directory, "ablation_run.json")
    record = {"variant": variant, "seed": seed, "dir": directory, **stamp}

    final = read_final_metrics(directory)
    # The stamp is written after a successful run, so without it the run is not known finished.
    if final is not None and os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            previous = json.load(f)
        if any(previous.get(k) != v for k, v in stamp.items()):
            raise RuntimeError(
                f"{directory} holds a finished run of another command or config:\n  "
                f"{shlex.join(previous['train_net_args'])}\nRemove it or give another --output."
            )
        logger.info(f"{variant} seed {seed}: done before, skipped")
        return dict(record, metrics=pick_metrics(final), wall_s=previous.get("wall_s"))
    if args.collect_only or args.dry_run:
        if args.dry_run:
            print(shlex.join([sys.executable, "train_net.py", *cmd_args]))
        return None

    # A run that stopped before its evaluation is started over: detectron2 appends to
    # metrics.json, and a resumed run would not see the same images as an uninterrupted one.
    if os.path.isdir(directory):
        logger.info(f"{variant} seed {seed}: removing the unfinished run in {directory}")
        shutil.rmtree(directory)
    os.makedirs(directory)
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(args.num_threads), MKL_NUM_THREADS=str(args.num_threads))
    logger.info(f"{variant} seed {seed}: training in {directory}")
    start = time.perf_counter()
    with open(os.path.join(directory, "stdout.txt"), "w") as out:
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO_ROOT, "train_net.py"), *cmd_args],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wall_s = time.perf_counter() - start
    final = read_final_metrics(directory)
    if proc.returncode != 0 or final is None:
        raise RuntimeError(
            f"{variant} seed {seed} failed (exit code {proc.returncode}); "
            f"see {os.path.join(directory, 'stdout.txt')}"
        )
    with open(stamp_path, "w") as f:
        json.dump(dict(stamp, wall_s=wall_s), f, indent=2)
    metrics = pick_metrics(final)
    logger.info(
        f"{variant} seed {seed}: box AP {metrics.get('box_AP', float('nan')):.1f} "
        f"in {wall_s:.0f} s"
    )
    return dict(record, metrics=metrics, wall_s=wall_s)


def main(args):
    setup_logger(name="retinamask_d2.ablation", abbrev_name="ablation")
    # train_net.py runs in the repository, where the datasets root "datasets" is; paths given
    # relative to the caller's directory are rewritten relative to the repository.
    for name in ("output", "config_file", "retinanet_config"):
        setattr(args, name, os.path.relpath(os.path.abspath(getattr(args, name)), REPO_ROOT))
    os.chdir(REPO_ROOT)
    retinamask_cfg = load_cfg(args.config_file, args.opts)
    if "retinanet" in args.variants:
        diff = config_differences(retinamask_cfg, load_cfg(args.retinanet_config, args.opts))
        if diff:
            raise ValueError(
                f"{args.retinanet_config} and {args.config_file} differ beyond the architecture, "
                "so RetinaNet would not be trained like RetinaMask:\n"
                + "\n".join(f"  {k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
    schedule = scaled_schedule(retinamask_cfg, args.max_iter)

    start = time.perf_counter()
    runs = []
    for seed in args.seeds:
        # Seed-major order: a partial ablation already has every variant for the first seeds.
        for variant in args.variants:
            record = run_one(args, variant, seed, schedule)
            if record is not None:
                runs.append(record)
    if args.dry_run:
        return None

    summary = summarize(runs, [v for v in args.variants if any(r["variant"] == v for r in runs)])
    print(format_table(summary))
    results = {
        "max_iter": args.max_iter,
        "schedule": [str(x) for x in schedule],
        "seeds": args.seeds,
        "config_file": args.config_file,
        "retinanet_config": args.retinanet_config,
        "opts": args.opts,
        "wall_s": time.perf_counter() - start,
        "summary": summary,
        "runs": runs,
        "paper_coco_minival": {v: PAPER_COCO[v] for v in summary},
    }
    path = os.path.join(args.output, "results.json")
    os.makedirs(args.output, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    logger.info(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(parse_args())
