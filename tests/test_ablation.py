import importlib.util
import json
import os
import subprocess

import pytest

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location(
    "ablation", os.path.join(REPO_ROOT, "tools", "ablation.py")
)
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)

CONFIG = os.path.join(REPO_ROOT, ablation.RETINAMASK_CONFIG)


def _variant_cfg(variant):
    _, overrides = ablation.VARIANTS[variant]
    return ablation.load_cfg(CONFIG, overrides)


def test_variants_set_the_paper_settings():
    expected = {
        "match0.5+fixed": (0.5, "SmoothL1Loss", False),
        "match0.0+fixed": (0.0, "SmoothL1Loss", False),
        "match0.0+selfadj": (0.0, "SelfAdjustingSmoothL1Loss", False),
        "retinamask": (0.0, "SelfAdjustingSmoothL1Loss", True),
        "retinamask-d2units": (0.0, "SelfAdjustingSmoothL1Loss", True),
    }
    for variant, (threshold, loss, mask_on) in expected.items():
        cfg = _variant_cfg(variant)
        assert cfg.MODEL.META_ARCHITECTURE == "RetinaMask"
        assert cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.NAME == "BestMatchMatcher"
        assert cfg.MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD == threshold
        assert cfg.MODEL.RETINAMASK.BOX_REG_LOSS.NAME == loss
        assert cfg.MODEL.RETINAMASK.BOX_REG_LOSS.BETA == 0.11
        assert cfg.MODEL.MASK_ON == mask_on


def test_variant_list():
    assert list(ablation.VARIANTS) == [
        "retinanet", "match0.5+fixed", "match0.0+fixed", "match0.0+selfadj", "retinamask",
        "retinamask-d2units",
    ]  # fmt: skip
    assert set(ablation.PAPER_COCO) == set(ablation.VARIANTS)
    args = ablation.parse_args(["--variants", "retinamask", "retinamask-d2units"])
    assert args.variants == ["retinamask", "retinamask-d2units"]


def _changed_keys(previous, current):
    a = ablation._flatten(_variant_cfg(previous))
    b = ablation._flatten(_variant_cfg(current))
    return {k for k in a if a[k] != b[k]}


def test_each_retinamask_variant_changes_one_key():
    names = [v for v in ablation.VARIANTS if ablation.VARIANTS[v][0] == "retinamask"]
    names.remove("retinamask-d2units")
    for previous, current in zip(names, names[1:]):
        assert len(_changed_keys(previous, current)) == 1, (previous, current)


def test_units_variant_changes_only_the_units():
    # "retinamask" trains in the config's reference units, the last row in detectron2's.
    cfg = _variant_cfg("retinamask")
    assert cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS == (10.0, 10.0, 5.0, 5.0)
    assert cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT == 0.25
    cfg = _variant_cfg("retinamask-d2units")
    assert cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS == (1.0, 1.0, 1.0, 1.0)
    assert cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT == 1.0
    assert _changed_keys("retinamask", "retinamask-d2units") == {
        "MODEL.RETINANET.BBOX_REG_WEIGHTS", "MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT"
    }  # fmt: skip


def test_config_differences_ignore_only_the_architecture():
    retinamask = ablation.load_cfg(CONFIG)
    retinanet = ablation.load_cfg(
        CONFIG,
        ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.MASK_ON", "False",
         "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", "0.11"],
    )  # fmt: skip
    assert ablation.config_differences(retinamask, retinanet) == {}
    retinanet.SOLVER.BASE_LR = 2 * retinamask.SOLVER.BASE_LR
    assert ablation.config_differences(retinamask, retinanet) == {
        "SOLVER.BASE_LR": (retinamask.SOLVER.BASE_LR, retinanet.SOLVER.BASE_LR)
    }


def test_scaled_schedule_keeps_fractions():
    cfg = ablation.load_cfg(CONFIG, ["SOLVER.MAX_ITER", 2000, "SOLVER.STEPS", (1500, 1800),
                                     "SOLVER.WARMUP_ITERS", 100])  # fmt: skip
    opts = dict(zip(*[iter(ablation.scaled_schedule(cfg, 200))] * 2))
    assert opts["SOLVER.MAX_ITER"] == 200
    assert opts["SOLVER.STEPS"] == (150, 180)
    assert opts["SOLVER.WARMUP_ITERS"] == 10
    assert opts["SOLVER.CHECKPOINT_PERIOD"] == 200


def test_read_final_metrics_takes_the_evaluation_line(tmp_path):
    assert ablation.read_final_metrics(str(tmp_path)) is None
    lines = [
        json.dumps({"iteration": 19, "total_loss": 1.0}),
        json.dumps({"iteration": 20, "bbox/AP": 12.5, "bbox/AP-bar": float("nan")}),
        '{"iteration": 21, "tot',  # cut short
    ]
    (tmp_path / "metrics.json").write_text("\n".join(lines))
    record = ablation.read_final_metrics(str(tmp_path))
    assert record["bbox/AP"] == 12.5
    assert ablation.pick_metrics(record) == {"box_AP": 12.5}


def test_summarize_pairs_deltas_by_seed():
    runs = [
        {"variant": "a", "seed": 0, "metrics": {"box_AP": 10.0}},
        {"variant": "a", "seed": 1, "metrics": {"box_AP": 20.0}},
        {"variant": "b", "seed": 0, "metrics": {"box_AP": 11.0}},
        {"variant": "b", "seed": 1, "metrics": {"box_AP": 21.0}},
    ]
    summary = ablation.summarize(runs, ["a", "b"])
    assert summary["a"]["box_AP"]["mean"] == 15.0
    assert summary["a"]["box_AP"]["std"] == pytest.approx(7.0711, abs=1e-4)
    assert "box_AP_delta" not in summary["a"]
    # The seeds' spread cancels in the paired difference.
    assert summary["b"]["box_AP_delta"]["mean"] == 1.0
    assert summary["b"]["box_AP_delta"]["std"] == 0.0


def _finished_run(args, variant, seed, cmd_args):
    directory = ablation.run_dir(args.output, variant, seed)
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": 9, "bbox/AP": 3.0, "bbox/AP-bar": 1.0}) + "\n")
    with open(os.path.join(directory, "ablation_run.json"), "w") as f:
        json.dump(dict(ablation.run_stamp(cmd_args), wall_s=1.0), f)


def test_finished_runs_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", None)  # training would fail the test
    args = ablation.parse_args(["--output", str(tmp_path / "out"), "--config-file", CONFIG])
    schedule = ["SOLVER.MAX_ITER", 10]
    cmd_args = ablation.train_net_args(args, "retinamask", 0, schedule)
    _finished_run(args, "retinamask", 0, cmd_args)
    record = ablation.run_one(args, "retinamask", 0, schedule)
    assert record["metrics"] == {"box_AP": 3.0, "box_AP_bar": 1.0}

    other_schedule = ["SOLVER.MAX_ITER", 20]
    with pytest.raises(RuntimeError, match="another command"):
        ablation.run_one(args, "retinamask", 0, other_schedule)
