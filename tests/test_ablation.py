import glob
import importlib.util
import json
import os
import subprocess

import pytest
import yaml

from conftest import REPO_ROOT
from retinamask_d2 import get_retinamask_cfg

_spec = importlib.util.spec_from_file_location(
    "ablation", os.path.join(REPO_ROOT, "tools", "ablation.py")
)
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)

CONFIG_DIR = os.path.join(REPO_ROOT, ablation.CONFIG_DIR)
VARIANT_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def _variant_cfg(variant):
    return get_retinamask_cfg(os.path.join(CONFIG_DIR, variant + ".yaml"))


def _flatten(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _changed_keys(cfg_a, cfg_b):
    a, b = _flatten(cfg_a), _flatten(cfg_b)
    return {k for k in a if a[k] != b[k]}


def test_every_variant_has_a_config_and_a_paper_entry():
    stems = {os.path.basename(path)[: -len(".yaml")] for path in VARIANT_FILES}
    assert stems == set(ablation.VARIANTS) == set(ablation.PAPER_COCO)
    args = ablation.parse_args(["--variants", "retinamask", "retinamask-d2units"])
    assert args.variants == ["retinamask", "retinamask-d2units"]


# What each variant is about: the keys its file may change from its base.
VARIANT_KEYS = {
    "retinanet": set(),
    "match0.5+fixed": {
        "MODEL.MASK_ON",
        "MODEL.RETINAMASK.ANCHOR_MATCHER.BEST_MATCH_THRESHOLD",
        "MODEL.RETINAMASK.BOX_REG_LOSS.NAME",
    },
    "match0.0+fixed": {"MODEL.MASK_ON", "MODEL.RETINAMASK.BOX_REG_LOSS.NAME"},
    "match0.0+selfadj": {"MODEL.MASK_ON"},
    "retinamask": set(),
    "retinamask-d2units": {
        "MODEL.RETINANET.BBOX_REG_WEIGHTS",
        "MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT",
    },
}


@pytest.mark.parametrize("path", VARIANT_FILES, ids=os.path.basename)
def test_variant_differs_from_its_base_only_in_its_keys(path):
    variant = os.path.basename(path)[: -len(".yaml")]
    with open(path) as f:
        base = os.path.join(os.path.dirname(path), yaml.safe_load(f)["_BASE_"])
    assert (
        _changed_keys(get_retinamask_cfg(base), get_retinamask_cfg(path)) == VARIANT_KEYS[variant]
    )


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
    assert _variant_cfg("retinanet").MODEL.META_ARCHITECTURE == "RetinaNet"


def test_each_retinamask_row_changes_one_key_from_the_row_above():
    rows = ["match0.5+fixed", "match0.0+fixed", "match0.0+selfadj", "retinamask"]
    for previous, current in zip(rows, rows[1:]):
        changed = _changed_keys(_variant_cfg(previous), _variant_cfg(current))
        assert len(changed) == 1, (previous, current, changed)


def test_units_variant_changes_only_the_units():
    cfg = _variant_cfg("retinamask")
    assert cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS == (10.0, 10.0, 5.0, 5.0)
    assert cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT == 0.25
    cfg = _variant_cfg("retinamask-d2units")
    assert cfg.MODEL.RETINANET.BBOX_REG_WEIGHTS == (1.0, 1.0, 1.0, 1.0)
    assert cfg.MODEL.RETINAMASK.BBOX_REG_LOSS_WEIGHT == 1.0


def test_retinanet_is_trained_like_retinamask():
    # Only what makes them different models may differ: data, input, backbone, anchors and
    # schedule must agree, or the first row would not be a controlled comparison.
    changed = _changed_keys(_variant_cfg("retinamask"), _variant_cfg("retinanet"))
    assert changed == {
        "MODEL.META_ARCHITECTURE", "MODEL.MASK_ON", "MODEL.RETINANET.BBOX_REG_WEIGHTS",
        "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA", "OUTPUT_DIR",
    }  # fmt: skip


def test_unknown_variant_is_an_input_error(tmp_path):
    args = ablation.parse_args(["--variants", "retinamsk"])
    with pytest.raises(ablation.InputError, match="retinamsk.*has no config"):
        ablation.train_net_args(args, "retinamsk", 0)


def test_scaled_schedule_keeps_fractions():
    cfg = get_retinamask_cfg(
        None, ["SOLVER.MAX_ITER", 2000, "SOLVER.STEPS", (1500, 1800), "SOLVER.WARMUP_ITERS", 100]
    )
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


def test_table_rows_and_paper_column():
    runs = [
        {"variant": "retinanet", "seed": 0, "metrics": {"box_AP": 5.0}},
        {"variant": "retinamask", "seed": 0, "metrics": {"box_AP": 6.5, "mask_AP": 7.0}},
    ]
    table = ablation.format_table(ablation.summarize(runs, ["retinanet", "retinamask"])).split("\n")
    assert table[0].startswith("| variant | seeds | box AP | AP50 | AP75 | AP-bar | mask AP |")
    assert table[2] == "| retinanet | 1 | 5.0 | - | - | - | - | - | - | - |"
    assert table[3] == "| retinamask | 1 | 6.5 | - | - | - | 7.0 | - | +1.5 | 36.9/32.7 |"
    assert table[-1] == "  retinamask: Table 3, P3-P5 1x"


def _finished_run(args, variant, seed, cmd_args):
    directory = ablation.run_dir(args.output, variant, seed)
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": 9, "bbox/AP": 3.0, "bbox/AP-bar": 1.0}) + "\n")
    with open(os.path.join(directory, "ablation_run.json"), "w") as f:
        json.dump(dict(ablation.run_stamp(cmd_args), wall_s=1.0), f)


def test_finished_runs_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", None)  # training would fail the test
    argv = ["--output", str(tmp_path / "out"), "--config-dir", CONFIG_DIR, "--max-iter", "10"]
    args = ablation.parse_args(argv)
    _finished_run(args, "retinamask", 0, ablation.train_net_args(args, "retinamask", 0))
    record = ablation.run_one(args, "retinamask", 0)
    assert record["metrics"] == {"box_AP": 3.0, "box_AP_bar": 1.0}

    args.max_iter = 20
    with pytest.raises(RuntimeError, match="another command"):
        ablation.run_one(args, "retinamask", 0)
