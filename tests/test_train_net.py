"""
train_net.py end to end on the CPU: training with COCO evaluation (box AP of box-only inference,
mask AP of the top 50), resuming after SIGKILL, two-process training, clear errors for bad input,
and checkpoints that are never half-written.
"""

import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

import train_net
from conftest import CONFIG_DIR, REPO_ROOT
from retinamask_d2 import InputError
from retinamask_d2.checkpoint import AtomicDetectionCheckpointer
from retinamask_d2.data import prepare_synthetic_datasets, register_synthetic_shapes
from retinamask_d2.engine import build_config, check_before_launch

CONFIG = os.path.join(CONFIG_DIR, "synthetic", "retinamask_synthetic.yaml")

# The shipped synthetic config on a short schedule: small batches, a short warmup, no
# evaluation during training, fixed seed. Checkpoints are ~100 MB, so they are written rarely.
FAST_OPTS = [
    "MODEL.DEVICE", "cpu",
    "SEED", "1",
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.WARMUP_ITERS", "10",
    "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip

SUBPROCESS_TIMEOUT = 600


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """$DETECTRON2_DATASETS holding the default synthetic_shapes splits, generated once."""
    root = str(tmp_path_factory.mktemp("datasets"))
    prepare_synthetic_datasets(["synthetic_shapes_train", "synthetic_shapes_val"], root)
    return root


@pytest.fixture
def registered_in_process(datasets_root, monkeypatch):
    """The synthetic_shapes datasets of this process read from datasets_root."""
    monkeypatch.setenv("DETECTRON2_DATASETS", datasets_root)
    register_synthetic_shapes(datasets_root)
    yield
    monkeypatch.undo()
    register_synthetic_shapes()


def _env(datasets_root):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _train_net(datasets_root, *args, **popen_kwargs):
    return subprocess.Popen(
        [sys.executable, "train_net.py", "--config-file", CONFIG, *args],
        cwd=REPO_ROOT,
        env=_env(datasets_root),
        **popen_kwargs,
    )


def _parse_args(*argv, config=CONFIG):
    return train_net.argument_parser().parse_args(["--config-file", config, *map(str, argv)])


def _load(path):
    # Files this test wrote; trainer state holds more than tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------
# Training, checkpointing and evaluation, as the README's command runs them.
# ------------------------------------------------------------------------------------------------


def test_train_checkpoint_and_evaluate(datasets_root, tmp_path):
    out = str(tmp_path / "out")
    proc = _train_net(
        datasets_root,
        "--num-gpus", "1",
        *FAST_OPTS,
        "OUTPUT_DIR", out,
        "SOLVER.MAX_ITER", "40",
        "SOLVER.CHECKPOINT_PERIOD", "20",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    log, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, log[-5000:]

    # metrics.json has one record per 20 iterations (median-smoothed losses), then the
    # evaluation results.
    records = _metrics(out)
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) == 2 and losses[-1] < losses[0], records
    training = [r for r in records if "total_loss" in r]
    assert all(k in training[-1] for k in ("loss_cls", "loss_box_reg", "loss_mask"))
    for stat in ("beta", "mean", "var"):
        assert all(f"box_reg_{stat}/{c}" in training[-1] for c in ("dx", "dy", "dw", "dh"))

    for name in ("model_0000019.pth", "model_final.pth"):
        assert os.path.isfile(os.path.join(out, name)), os.listdir(out)
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"
    final = _load(os.path.join(out, "model_final.pth"))
    assert final["iteration"] == 39
    assert (
        "optimizer" in final["trainer"]["_trainer"] and "LRScheduler" in final["trainer"]["hooks"]
    )
    assert "box_reg_loss.running_mean" in final["model"] and "loss_normalizer" in final["model"]
    assert not torch.equal(final["model"]["box_reg_loss.running_mean"], torch.full((4,), 0.11))

    # COCOEvaluator's bbox and segm tables are in the log and their numbers in metrics.json.
    # The model these 40 iterations start from scores every anchor about 0.01, under the 0.05
    # threshold: no detection, AP NaN (0). Trained, seeds 1 to 5 gave box AP 0.23, 0.39, 0.97,
    # 0.46, 0.49 and mask AP 0.050, 0.12, 0.31, 0.30, 0.14 with OMP_NUM_THREADS=1; seed 1 gave
    # 0.14 and 0.025 with 2 threads. Measured as this test runs train_net.py, with SEED s; the
    # untrained model with --eval-only MODEL.WEIGHTS "" and no SOLVER options.
    for task, above in (("bbox", 0.05), ("segm", 0.01)):
        assert f"copypaste: Task: {task}" in log
        assert above < records[-1][f"{task}/AP"] <= 100, records[-1]
    assert os.path.isfile(os.path.join(out, "inference", "coco_instances_results.json"))
    assert not glob.glob(os.path.join(out, ".*.partial"))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def test_eval_only_box_ap_with_masks_is_box_only_box_ap(
    datasets_root, registered_in_process, tmp_path
):
    # Sec. 3.5: the paper's box AP comes from box-only inference (100 detections per image), its
    # mask AP from the top 50; one --eval-only run with masks reports both.
    # Trained in a process of its own: in this one, the CPU kernels' sums come out slightly
    # differently after other work (a ResNet-50 training step of another test suffices), and
    # 30 iterations carry that to a different model (mask AP 0.0093 instead of 0.026).
    train_dir = str(tmp_path / "train")
    proc = _train_net(
        datasets_root, "--num-gpus", "1", *FAST_OPTS, "OUTPUT_DIR", train_dir,
        "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "30", "SOLVER.CHECKPOINT_PERIOD", "1000",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    log, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, log[-5000:]
    results, detections = {}, {}
    for mask_on in (True, False):
        eval_dir = tmp_path / f"eval_mask_on_{mask_on}"
        args = _parse_args(
            "--eval-only", *FAST_OPTS, "OUTPUT_DIR", eval_dir, "MODEL.MASK_ON", mask_on,
            "MODEL.WEIGHTS", os.path.join(train_dir, "model_final.pth"),
            # Every image gets the full 100 detections, twice as many as get masks.
            "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        )  # fmt: skip
        results[mask_on] = train_net.main(args)
        detections[mask_on] = _read_json(eval_dir / "inference" / "coco_instances_results.json")

    num_images = len(DatasetCatalog.get("synthetic_shapes_val"))
    assert len(detections[True]) == 100 * num_images
    assert detections[True] == detections[False]  # same boxes, scores and classes
    np.testing.assert_equal(results[True]["bbox"], results[False]["bbox"])
    assert "segm" not in results[False]

    # The model training started from (same seed, no weights), evaluated alike. Seeds 1 to 5
    # gave it box AP 0.0098, 0.0062, 0.0055, 0.025, 0.017 and mask AP 0.0005 or less; trained,
    # box AP 0.073, 0.64, 0.40, 0.81, 0.33 and mask AP 0.026, 0.10, 0.10, 0.11, 0.095, with
    # OMP_NUM_THREADS=1 (seed 1 with 2 threads: 0.10 and 0.029): gaps of 0.063 and 0.025 at
    # least. Measured with these runs as train_net.py command lines, with SEED s.
    untrained = train_net.main(
        _parse_args(
            "--eval-only", *FAST_OPTS, "OUTPUT_DIR", tmp_path / "eval_untrained",
            "MODEL.WEIGHTS", "", "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
        )
    )  # fmt: skip
    assert results[True]["bbox"]["AP"] > untrained["bbox"]["AP"] + 0.03
    assert results[True]["segm"]["AP"] > untrained["segm"]["AP"] + 0.01
    assert results[True]["bbox"]["AP"] <= 100 and results[True]["segm"]["AP"] <= 100
    # Mask AP is of each image's top 50 detections, with their masks.
    masks = _read_json(tmp_path / "eval_mask_on_True/inference/segm/coco_instances_results.json")
    assert all("segmentation" in d for d in masks)
    top50 = []
    for image_id in dict.fromkeys(d["image_id"] for d in detections[True]):
        top50 += [d for d in detections[True] if d["image_id"] == image_id][:50]
    assert [{k: v for k, v in d.items() if k != "segmentation"} for d in masks] == top50


# ------------------------------------------------------------------------------------------------
# Resuming after SIGKILL.
# ------------------------------------------------------------------------------------------------


def _loss_statistics(state_dict):
    return {
        k: state_dict[k].clone()
        for k in ("box_reg_loss.running_mean", "box_reg_loss.running_var", "loss_normalizer")
    }


def test_resume_after_sigkill(datasets_root, registered_in_process, tmp_path):
    out = str(tmp_path / "out")
    opts = [*FAST_OPTS, "OUTPUT_DIR", out, "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", 5]
    # Far more iterations than the test waits for: the run is killed, it never ends.
    proc = _train_net(
        datasets_root,
        "--num-gpus", "1", *map(str, opts), "SOLVER.MAX_ITER", "100000",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        last_checkpoint = os.path.join(out, "last_checkpoint")
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not os.path.exists(last_checkpoint):
            assert proc.poll() is None, f"training exited with {proc.returncode}"
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    with open(last_checkpoint) as f:
        saved_file = os.path.join(out, f.read())
    saved = _load(saved_file)
    iteration = saved["iteration"]
    assert (iteration + 1) % 5 == 0

    # train_net.main, step by step, to look at the state training resumes with.
    args = _parse_args("--resume", *opts, "SOLVER.MAX_ITER", iteration + 4)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)

    assert trainer.start_iter == iteration + 1
    restored = trainer.model.state_dict()
    for name, value in _loss_statistics(saved["model"]).items():
        assert torch.equal(restored[name], value), name
    assert not torch.equal(restored["box_reg_loss.running_mean"], torch.full((4,), 0.11))
    assert trainer.scheduler.last_epoch == iteration + 1
    saved_momentum = saved["trainer"]["_trainer"]["optimizer"]["state"]
    momentum = trainer.optimizer.state_dict()["state"]
    assert saved_momentum and momentum.keys() == saved_momentum.keys()
    assert all(
        torch.equal(momentum[k]["momentum_buffer"], v["momentum_buffer"])
        for k, v in saved_momentum.items()
    )

    trainer.train()
    final = _load(os.path.join(out, "model_final.pth"))
    assert final["iteration"] == iteration + 3


# ------------------------------------------------------------------------------------------------
# Two processes on the CPU.
# ------------------------------------------------------------------------------------------------

# train_net's setup and Trainer under detectron2's launch, as `train_net.py --num-gpus 2` runs
# them; each rank then saves what its replica ended with.
_TWO_PROCESS_WORKER = textwrap.dedent("""
    import os
    import torch
    from detectron2.engine import launch
    from detectron2.utils import comm

    import train_net
    from retinamask_d2.engine import leaves_process_group


    def worker(args):
        cfg = train_net.setup(args)
        trainer = train_net.Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
        torch.save(
            {
                "world_size": comm.get_world_size(),
                "num_threads": torch.get_num_threads(),
                "ddp": hasattr(trainer.model, "module"),
                "iteration": trainer.iter,
                "beta": model.box_reg_loss.beta,
                "running_mean": model.box_reg_loss.running_mean,
                "running_var": model.box_reg_loss.running_var,
                "weights": model.head.bbox_pred.weight.detach(),
            },
            os.path.join(cfg.OUTPUT_DIR, f"rank{comm.get_rank()}.pth"),
        )


    if __name__ == "__main__":
        args = train_net.argument_parser().parse_args()
        launch(leaves_process_group(worker), args.num_gpus, dist_url=args.dist_url, args=(args,))
    """)


def test_two_processes_share_the_self_adjusting_beta(datasets_root, dist_url, tmp_path):
    out = str(tmp_path / "out")
    script = tmp_path / "two_process_worker.py"
    script.write_text(_TWO_PROCESS_WORKER)
    result = subprocess.run(
        [
            sys.executable, str(script), "--config-file", CONFIG, "--num-gpus", "2",
            "--dist-url", dist_url,
            *FAST_OPTS, "OUTPUT_DIR", out, "DATASETS.TEST", "()",
            "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "100",
        ],
        cwd=REPO_ROOT,
        env=_env(datasets_root),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]

    ranks = [_load(os.path.join(out, f"rank{r}.pth")) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["ddp"] and rank["iteration"] == 8
        # The two processes share the machine's cores rather than each taking all of them.
        assert rank["num_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    # Each replica saw different images, yet both hold the statistics of the whole batch.
    for key in ("beta", "running_mean", "running_var", "weights"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert not torch.equal(ranks[0]["running_mean"], torch.full((4,), 0.11))
    # Only the main process writes checkpoints.
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------


def test_package_messages_reach_the_log(tmp_path):
    out = tmp_path / "out"
    train_net.setup(_parse_args("OUTPUT_DIR", out))
    # As the synthetic dataset's generator reports its progress.
    logging.getLogger("retinamask_d2.data.synthetic").info("generating synthetic_shapes_train")
    assert "generating synthetic_shapes_train" in (out / "log.txt").read_text()


def test_missing_config_file_is_named():
    args = _parse_args()
    args.config_file = "configs/synthetic/retinamask_synthtic.yaml"
    with pytest.raises(InputError, match="retinamask_synthtic.yaml.*does not exist"):
        train_net.setup(args)


@pytest.fixture
def bad_dataset(datasets_root, tmp_path):
    """Registers a COCO dataset with a given JSON text; unregistered afterwards."""
    val_dir = os.path.join(datasets_root, "synthetic_shapes", "val")
    with open(os.path.join(val_dir, "instances.json")) as f:
        good = json.load(f)
    name = "train_net_bad_input"

    def register(content, image_root=os.path.join(val_dir, "images")):
        json_file = str(tmp_path / "bad.json")
        with open(json_file, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        register_coco_instances(name, {}, json_file, image_root)
        return name, json_file

    register.good, register.image_root = good, os.path.join(val_dir, "images")
    yield register
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _edit(data, **images_or_annotations):
    data = json.loads(json.dumps(data))
    data.update(images_or_annotations)
    return data


def _bad_inputs(tmp_path, bad_dataset):
    good = bad_dataset.good
    # The dataset's images with the third one cut short.
    corrupt_dir = tmp_path / "corrupt"
    shutil.copytree(bad_dataset.image_root, corrupt_dir)
    third = corrupt_dir / good["images"][2]["file_name"]
    third.write_bytes(third.read_bytes()[:200])
    out_of_range = json.loads(json.dumps(good))
    out_of_range["annotations"][0]["category_id"] = 9
    out_of_range["categories"].append({"id": 9, "name": "extra", "supercategory": "shape"})
    missing = json.loads(json.dumps(good))
    missing["images"][1]["file_name"] = "no_such_image.png"
    return {
        "json does not parse": ('{"images": [', None, ValueError, "bad.json.*not valid JSON"),
        "no images": (_edit(good, images=[], annotations=[]), None, ValueError, "no images"),
        "missing image": (missing, None, ValueError, "are missing: .*no_such_image.png"),
        "image does not decode": (good, str(corrupt_dir), ValueError, f"decoded: .*{third.name}"),
        "category out of range": (out_of_range, None, ValueError, "NUM_CLASSES"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "json does not parse",
        "no images",
        "missing image",
        "image does not decode",
        "category out of range",
    ],
)
def test_bad_training_data_is_named_before_training(case, bad_dataset, tmp_path):
    content, image_root, error, message = _bad_inputs(tmp_path, bad_dataset)[case]
    name, _ = bad_dataset(content, *([image_root] if image_root else []))
    args = _parse_args(*FAST_OPTS, "OUTPUT_DIR", tmp_path / "out", "DATASETS.TRAIN", f"('{name}',)")
    with pytest.raises(error, match=message):
        check_before_launch(build_config(args), args)


def test_bad_test_data_is_named_before_evaluation(bad_dataset, tmp_path):
    name, _ = bad_dataset('{"images": [')
    args = _parse_args("--eval-only", *FAST_OPTS, "DATASETS.TEST", f"('{name}',)")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        check_before_launch(build_config(args), args)


# ------------------------------------------------------------------------------------------------
# AtomicDetectionCheckpointer: a checkpoint is never half-written where last_checkpoint points.
# ------------------------------------------------------------------------------------------------

# Saves the same name over and over, each time with every weight equal to the iteration, the
# case where fvcore's in-place writes leave last_checkpoint pointing at a truncated file.
_SAVE_FOREVER = textwrap.dedent("""
    import sys
    import torch
    from retinamask_d2.checkpoint import AtomicDetectionCheckpointer

    model = torch.nn.Linear(1024, 4096)
    checkpointer = AtomicDetectionCheckpointer(model, sys.argv[1])
    iteration = 0
    while True:
        with torch.no_grad():
            model.weight.fill_(iteration)
        checkpointer.save("model_final", iteration=iteration)
        print(iteration, flush=True)
        iteration += 1
    """)


def test_checkpoint_killed_while_saving_keeps_the_last_complete_one(tmp_path):
    script = tmp_path / "save_forever.py"
    script.write_text(_SAVE_FOREVER)
    save_dir = tmp_path / "out"
    save_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Kills land at different points of a save: while torch.save writes, during fsync, between
    # the two renames.
    for delay in (0.0, 0.013, 0.029, 0.047):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(save_dir)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout.readline(), "the saving process died"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        with open(save_dir / "last_checkpoint") as f:
            assert f.read() == "model_final.pth"
        saved = _load(save_dir / "model_final.pth")
        assert torch.all(saved["model"]["weight"] == saved["iteration"])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    checkpointer.save("model_final", iteration=1)
    before = (tmp_path / "model_final.pth").read_bytes()

    with pytest.raises(Exception):
        # A lambda cannot be pickled: torch.save fails after it has started writing.
        checkpointer.save("model_final", iteration=2, broken=lambda: None)
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]

    # A temporary file left by a killed save is removed by the next save.
    (tmp_path / ".model_0000009.pth.abc.partial").write_bytes(b"trunc")
    checkpointer.save("model_0000009", iteration=9)
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint", "model_0000009.pth", "model_final.pth"
    ]  # fmt: skip
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000009.pth")


# ------------------------------------------------------------------------------------------------
# The command line: one-line errors, own COCO data, two machines.
# ------------------------------------------------------------------------------------------------


def _run(datasets_root, *args, config=CONFIG):
    env = dict(_env(datasets_root), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "train_net.py", "--config-file", config, *map(str, args)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip


def _error_line(result):
    assert result.returncode != 0, result.stdout[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]


@pytest.mark.parametrize(
    "case",
    [
        "batch 0",
        "batch not divisible",
        "plain text config",
        "test resize",
        "missing weights",
        "text weights",
        "empty mask levels",
        "empty mask levels, two processes",
    ],
)
def test_bad_input_is_one_line_before_training(case, datasets_root, dist_url, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some text\n")
    # (flags, KEY VALUE options after FAST_OPTS, config file, expected message)
    flags, opts, config, expected = {
        "batch 0": ([], ["SOLVER.IMS_PER_BATCH", 0], CONFIG, "IMS_PER_BATCH 0 .* set it to"),
        "batch not divisible": (
            ["--num-gpus", 2], ["SOLVER.IMS_PER_BATCH", 3], CONFIG, "multiple of 2: set it to e.g. 2"
        ),
        "plain text config": ([], [], str(text), "not a YAML mapping"),
        # Used only when the model is evaluated, after training: checked before it starts.
        "test resize": (
            [], ["MODEL.RETINAMASK.TEST_RESIZE", "authors"], CONFIG, "TEST_RESIZE is 'authors'"
        ),
        "missing weights": (
            ["--num-gpus", 2], ["MODEL.WEIGHTS", tmp_path / "none.pth"], CONFIG, "none.pth.: no such"
        ),
        "text weights": (["--eval-only"], ["MODEL.WEIGHTS", text], CONFIG, "notes.txt"),
        "empty mask levels": (
            [], ["MODEL.RETINAMASK.MASK_IN_FEATURES", "[]"], CONFIG, "MASK_IN_FEATURES"
        ),
        # Raised in the spawned processes, printed by the launching one.
        "empty mask levels, two processes": (
            ["--num-gpus", 2, "--dist-url", dist_url], ["MODEL.RETINAMASK.MASK_IN_FEATURES", "[]"],
            CONFIG,
            "MASK_IN_FEATURES",
        ),
    }[case]  # fmt: skip
    out = tmp_path / "out"
    result = _run(datasets_root, *flags, *FAST_OPTS, "OUTPUT_DIR", out, *opts, config=config)
    lines = _error_line(result)
    assert len(lines) == 1 and re.search(expected, lines[0]), result.stderr[-3000:]
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")
    # The config, the batch and the weights' file are checked before anything is written.
    if case in ("batch 0", "batch not divisible", "plain text config", "test resize",
                "missing weights"):  # fmt: skip
        assert not os.path.exists(tmp_path / "out")


def _two_class_subset(datasets_root, tmp_path):
    """synthetic_shapes_val with only its first two categories: a COCO file with 2 classes."""
    val_dir = os.path.join(datasets_root, "synthetic_shapes", "val")
    data = _read_json(os.path.join(val_dir, "instances.json"))
    keep = {c["id"] for c in data["categories"][:2]}
    data["categories"] = data["categories"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
    json_file = tmp_path / "two_classes.json"
    json_file.write_text(json.dumps(data))
    return str(json_file), os.path.join(val_dir, "images")


def test_register_coco_trains_with_the_class_count_of_the_json(datasets_root, tmp_path):
    json_file, image_dir = _two_class_subset(datasets_root, tmp_path)
    out = tmp_path / "out"
    # A config that does not set MODEL.RETINANET.NUM_CLASSES (detectron2's default: 80).
    small = ["MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
             "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
             "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", 128,
             "INPUT.MASK_FORMAT", "bitmask"]  # fmt: skip
    result = _run(
        datasets_root, "--register-coco", "my_shapes", json_file, image_dir,
        *FAST_OPTS, *small, "DATASETS.TRAIN", "('my_shapes',)", "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", 2, "OUTPUT_DIR", out,
        config=os.path.join(CONFIG_DIR, "retinamask_R50.yaml"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    final = _load(out / "model_final.pth")["model"]
    # 9 anchors per position x 2 classes.
    assert final["head.cls_score.weight"].shape[0] == 9 * 2

    result = _run(datasets_root, "--register-coco", "coco_2017_val", json_file, image_dir)
    (line,) = _error_line(result)
    assert "coco_2017_val" in line and "built-in" in line


def test_two_machines_on_loopback_train_and_finish(datasets_root, dist_url, tmp_path):
    out = tmp_path / "out"
    env = dict(_env(datasets_root), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "train_net.py", "--config-file", CONFIG, "--num-gpus", "1",
             "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", dist_url,
             *FAST_OPTS, "OUTPUT_DIR", str(out), "DATASETS.TEST", "()",
             "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100"],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=SUBPROCESS_TIMEOUT)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]
    assert _load(out / "model_final.pth")["iteration"] == 3
    # One process on each machine, ranks 0 and 1 of one run (rank 1 logs to its file only).
    assert "Rank of current process: 0. World size: 2" in (out / "log.txt").read_text()
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
