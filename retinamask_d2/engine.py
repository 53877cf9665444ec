"""
What train_net.py adds to detectron2's entry points: datasets given on the command line, checks
run before any process starts, DistributedDataParallel on the CPU, processes that leave their
process group before they exit, and bad input reported as one line.
"""

import contextlib
import functools
import sys

import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException
from detectron2.config import CfgNode
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

from .checkpoint import check_weights_exist
from .config import InputError, get_retinamask_cfg
from .data import check_datasets, dataset_num_classes, drop_invalid_annotations
from .data import prepare_synthetic_datasets, register_coco_datasets

__all__ = [
    "argument_parser",
    "build_config",
    "check_before_launch",
    "create_ddp_model",
    "leaves_process_group",
    "one_line_errors",
]


def argument_parser():
    """detectron2's ``default_argument_parser`` with ``--register-coco`` and
    ``--drop-invalid-annotations``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[],
        metavar=("NAME", "JSON", "IMAGE_DIR"), help="register a COCO-format dataset (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--drop-invalid-annotations", action="store_true",
        help="train without the annotations the dataset check rejects, instead of stopping",
    )  # fmt: skip
    return parser


def build_config(args):
    """
    The frozen config of a run, after registering the datasets of ``--register-coco`` (whose
    first file gives NUM_CLASSES unless the config or options set it). Every process calls it.
    """
    register_coco_datasets(args.register_coco)
    cfg = get_retinamask_cfg(args.config_file, args.opts)
    key = "MODEL.RETINANET.NUM_CLASSES"
    if args.register_coco and not _config_sets(args.config_file, args.opts, key):
        cfg.MODEL.RETINANET.NUM_CLASSES = dataset_num_classes(args.register_coco[0][0])
    if args.drop_invalid_annotations:
        drop_invalid_annotations([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST])
    cfg.freeze()
    return cfg


def _config_sets(config_file, opts, key: str) -> bool:
    # Whether opts, config_file or a file of its _BASE_ chain sets key, default or not.
    node = CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node is not None or key in list(opts)[::2]


def check_before_launch(cfg, args):
    """
    In the launching process: stop on a batch that the processes cannot share or on
    MODEL.WEIGHTS naming no file, and generate and check the datasets of the run, so that
    workers only read them.
    """
    processes, batch = args.num_gpus * args.num_machines, cfg.SOLVER.IMS_PER_BATCH
    if batch <= 0 or batch % processes:
        raise InputError(
            f"SOLVER.IMS_PER_BATCH {batch} is the total batch of all {processes} training "
            f"process(es) and must be a positive multiple of {processes}: set it to e.g. "
            f"{processes * max(1, batch // processes)}."
        )
    if not args.resume:  # a resumed run may load its last checkpoint instead
        check_weights_exist(cfg.MODEL.WEIGHTS)
    training = () if args.eval_only else tuple(cfg.DATASETS.TRAIN)
    names = list(dict.fromkeys([*cfg.DATASETS.TEST, *training]))
    prepare_synthetic_datasets(names)
    check_datasets(names, cfg.MODEL.RETINANET.NUM_CLASSES, training)


def create_ddp_model(model):
    """
    detectron2's create_ddp_model, also for replicas on the CPU: detectron2 passes
    device_ids=[local rank], which DistributedDataParallel rejects for a module on the CPU.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    return d2_create_ddp_model(
        model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {})
    )


def leaves_process_group(main_func):
    """
    ``main_func`` for detectron2's ``launch``, which then, once ``main_func`` returns, waits for
    the other processes and destroys the process group. A process that leaves its gloo group to
    the interpreter's exit aborts now and then ("terminate called without an active exception",
    SIGABRT), and ``launch`` reports a run that finished as failed.
    """
    # A partial of a module-level function, so that spawned processes can unpickle it.
    return functools.partial(_run_and_leave_process_group, main_func)


def _run_and_leave_process_group(main_func, *args):
    result = main_func(*args)
    if dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()
    return result


@contextlib.contextmanager
def one_line_errors():
    """
    For command-line scripts: exit with ``ERROR: <message>`` and no traceback on an
    :class:`InputError`, also one raised in a process that detectron2's ``launch`` spawned.
    """
    try:
        yield
    except InputError as e:
        sys.exit(f"ERROR: {e}")
    except ProcessRaisedException as e:
        # A spawned process's exception arrives as the text of its traceback.
        error = str(e).strip().splitlines()[-1]
        if not error.startswith(f"{InputError.__module__}.InputError: "):
            raise
        sys.exit(f"ERROR: {error.split(': ', 1)[1]}")
