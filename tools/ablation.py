#!/usr/bin/env python
"""
Ablation of RetinaMask's training changes on synthetic_shapes, a miniature of the paper's Tables
1-3: each variant is ``configs/ablation/<variant>.yaml``, changing one thing from the row above.

    python3 tools/ablation.py                         # 6 variants x seeds 0 1 2
    python3 tools/ablation.py --variants retinamask retinamask-d2units --seeds 0 --max-iter 300
    python3 tools/ablation.py --collect-only          # table and JSON from the finished runs

A run is train_net.py in ``<output>/<variant>/seed<s>``, its schedule scaled to ``--max-iter``; a
finished run of the same command and merged config is skipped, so an ablation resumes. The box AP
change from the row above is paired by seed, less noisy than the difference of the means.
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

from detectron2.utils.logger import setup_logger

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from retinamask_d2 import InputError, get_retinamask_cfg  # noqa: E402
from retinamask_d2.engine import one_line_errors  # noqa: E402
from retinamask_d2.evaluation import read_metrics_json  # noqa: E402

logger = logging.getLogger("retinamask_d2.ablation")

CONFIG_DIR = "configs/ablation"
# The variants in table order (each row's delta is against the row above), with the paper's
# numbers for the same step on COCO minival, ResNet-50-FPN, 1x schedule.
PAPER_COCO = {
    "retinanet": {"source": "not ablated in Tables 1-3 (Table 4: 35.7 test-dev, from [25])"},
    "match0.5+fixed": {"source": "Table 1, threshold 0.5", "box_AP": 35.5},
    "match0.0+fixed": {"source": "Table 1, threshold 0 = Table 2, fixed beta 0.11", "box_AP": 36.2},
    "match0.0+selfadj": {"source": "Table 2, self-adjusting beta <= 0.11", "box_AP": 36.6},
    "retinamask": {"source": "Table 3, P3-P5 1x", "box_AP": 36.9, "mask_AP": 32.7},
    "retinamask-d2units": {"source": "not in the paper, which trains in the reference units"},
}
VARIANTS = list(PAPER_COCO)
# Name in results.json, key in detectron2's results, table column; "bar" is the thin-object class.
METRICS = [
    ("box_AP", "bbox/AP", "box AP"),
    ("box_AP50", "bbox/AP50", "AP50"),
    ("box_AP75", "bbox/AP75", "AP75"),
    ("box_AP_bar", "bbox/AP-bar", "AP-bar"),
    ("mask_AP", "segm/AP", "mask AP"),
    ("mask_AP50", "segm/AP50", None),
    ("mask_AP_bar", "segm/AP-bar", "mask AP-bar"),
]
TABLE_NOTES = """
Mean ± sample std over seeds, COCO-style AP in points on synthetic_shapes_val.
Δ box AP: per seed, this row minus the row above (same initialization and image order).
Paper column: box / mask AP on COCO minival, R-50-FPN, 1x schedule:"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="config file stems")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-iter", type=int, default=400, help="STEPS and WARMUP scale along")
    parser.add_argument("--output", default="output/ablation")
    parser.add_argument("--config-dir", default=CONFIG_DIR, help="holds <variant>.yaml")
    # On a shared CPU, more threads than free cores make every step several times slower.
    parser.add_argument("--num-threads", type=int, default=1, help="OMP/MKL threads per run")
    parser.add_argument("--collect-only", action="store_true", help="train nothing")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="overrides of all runs")
    return parser.parse_args(argv)


def scaled_schedule(cfg, max_iter):
    """SOLVER overrides that shrink (or stretch) the config's LR curve to ``max_iter``."""
    base = cfg.SOLVER.MAX_ITER
    steps = tuple(max(1, min(max_iter - 1, round(s * max_iter / base))) for s in cfg.SOLVER.STEPS)
    warmup = max(1, round(cfg.SOLVER.WARMUP_ITERS * max_iter / base))
    # One checkpoint (model_final.pth) and one evaluation, after the last iteration.
    solver = ["SOLVER.MAX_ITER", max_iter, "SOLVER.STEPS", steps, "SOLVER.WARMUP_ITERS", warmup]
    return solver + ["SOLVER.CHECKPOINT_PERIOD", max_iter, "TEST.EVAL_PERIOD", 0]


def run_dir(output, variant, seed):
    return os.path.join(output, variant, f"seed{seed}")


def train_net_args(args, variant, seed):
    """Arguments of train_net.py for one run, every value a string."""
    path = os.path.join(args.config_dir, variant + ".yaml")
    if not os.path.isfile(path):
        raise InputError(f"Variant {variant!r} has no config {path}. Add it or pick another.")
    schedule = scaled_schedule(get_retinamask_cfg(path, args.opts), args.max_iter)
    opts = ["MODEL.DEVICE", "cpu", "SEED", seed, "OUTPUT_DIR", run_dir(args.output, variant, seed)]
    return ["--config-file", path, "--num-gpus", "1", *map(str, opts + schedule + args.opts)]


def run_stamp(cmd_args):
    """A run's train_net.py arguments and the hash of its merged config (catches YAML edits)."""
    merged = get_retinamask_cfg(cmd_args[1], cmd_args[4:]).dump().encode()
    return {"train_net_args": cmd_args, "config_sha256": hashlib.sha256(merged).hexdigest()}


def read_final_metrics(directory):
    """The last evaluation record ("bbox/AP", ...) of ``<directory>/metrics.json``, or None."""
    path = os.path.join(directory, "metrics.json")
    records = read_metrics_json(path) if os.path.isfile(path) else []
    return next((r for r in reversed(records) if "bbox/AP" in r), None)


def pick_metrics(record):
    """The table's metrics from an evaluation record, in AP points; NaN is left out."""
    values = {name: record.get(key) for name, key, _ in METRICS}
    return {k: float(v) for k, v in values.items() if v is not None and not math.isnan(v)}


def _stats(values):
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def summarize(runs, variants):
    """
    Per variant: seeds, mean/std/values of each metric and ``box_AP_delta``, the box AP change
    from the previous variant paired by seed. ``runs``: ``[{"variant", "seed", "metrics"}]``.
    """
    by_variant = {v: {r["seed"]: r["metrics"] for r in runs if r["variant"] == v} for v in variants}
    summary = {}
    for previous, variant in zip([None, *variants], variants):
        results, before = by_variant[variant], by_variant.get(previous, {})
        entry = summary[variant] = {"seeds": sorted(results)}
        for name, _, _ in METRICS:
            values = [results[s][name] for s in entry["seeds"] if name in results[s]]
            if values:
                entry[name] = _stats(values)
        deltas = [results[s]["box_AP"] - before[s]["box_AP"] for s in results if s in before]
        if deltas:
            entry["box_AP_delta"] = dict(_stats(deltas), versus=previous)
    return summary


def _fmt(stats, signed=False):
    if stats is None:
        return "-"
    mean = f"{stats['mean']:+.1f}" if signed else f"{stats['mean']:.1f}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std']:.1f}"


def format_table(summary):
    columns = [(name, column) for name, _, column in METRICS if column]
    header = ["variant", "seeds", *[c for _, c in columns], "Δ box AP (paired)", "paper, COCO"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, entry in summary.items():
        paper = PAPER_COCO.get(variant, {})
        ref = "/".join(f"{paper[k]}" for k in ("box_AP", "mask_AP") if k in paper) or "-"
        row = [variant, str(len(entry["seeds"])), *[_fmt(entry.get(n)) for n, _ in columns]]
        lines.append("| " + " | ".join(row + [_fmt(entry.get("box_AP_delta"), True), ref]) + " |")
    notes = [f"  {v}: {PAPER_COCO.get(v, {}).get('source', '-')}" for v in summary]
    return "\n".join(lines + [TABLE_NOTES] + notes)


def run_one(args, variant, seed):
    """Train and evaluate one run unless it is finished. Returns its record, or None."""
    directory = run_dir(args.output, variant, seed)
    stamp = run_stamp(train_net_args(args, variant, seed))
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
    command = [sys.executable, "train_net.py", *stamp["train_net_args"]]
    if args.dry_run:
        print(shlex.join(command))
    if args.collect_only or args.dry_run:
        return None
    # An unfinished run starts over: detectron2 appends to metrics.json, and a resumed run
    # would not see the same images as an uninterrupted one.
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    threads = str(args.num_threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    logger.info(f"{variant} seed {seed}: training in {directory}")
    log = os.path.join(directory, "stdout.txt")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=out)
    wall_s = time.perf_counter() - start
    final = read_final_metrics(directory)
    if proc.returncode != 0 or final is None:
        raise RuntimeError(f"{variant} seed {seed} failed (exit code {proc.returncode}); see {log}")
    with open(stamp_path, "w") as f:
        json.dump(dict(stamp, wall_s=wall_s), f, indent=2)
    record.update(metrics=pick_metrics(final), wall_s=wall_s)
    logger.info(f"{variant} seed {seed}: box AP {record['metrics'].get('box_AP')}, {wall_s:.0f}s")
    return record


def main(args):
    setup_logger(name="retinamask_d2", abbrev_name="ablation")
    # train_net.py runs in the repository, where the datasets root "datasets" is; paths given
    # relative to the caller's directory are rewritten relative to the repository.
    args.output = os.path.relpath(os.path.abspath(args.output), REPO_ROOT)
    args.config_dir = os.path.relpath(os.path.abspath(args.config_dir), REPO_ROOT)
    os.chdir(REPO_ROOT)
    for variant in args.variants:  # a missing config or bad override stops before any training
        train_net_args(args, variant, 0)
    start = time.perf_counter()
    # Seed-major: a partial ablation already has every variant for the first seeds.
    runs = [run_one(args, variant, seed) for seed in args.seeds for variant in args.variants]
    runs = [r for r in runs if r is not None]
    if args.dry_run:
        return None
    summary = summarize(runs, [v for v in args.variants if any(r["variant"] == v for r in runs)])
    print(format_table(summary))
    results = dict(vars(args), wall_s=time.perf_counter() - start, summary=summary, runs=runs)
    results["paper_coco_minival"] = {v: PAPER_COCO.get(v) for v in summary}
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    logger.info(f"wrote {os.path.join(args.output, 'results.json')}")
    return results


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
