#!/usr/bin/env python
"""
Train and evaluate RetinaMask with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/retinamask_R50.yaml --num-gpus 8
    python train_net.py --config-file configs/retinamask_R50.yaml --eval-only MODEL.WEIGHTS W
    python train_net.py --config-file configs/retinamask_R50.yaml --num-gpus 8 --resume
    python train_net.py --config-file configs/retinamask_R50.yaml \\
        --register-coco my_train train.json images/ DATASETS.TRAIN "('my_train',)"

On a machine without a GPU, ``--num-gpus N MODEL.DEVICE cpu`` trains on N CPU processes.
"""

import os
import sys
import weakref

import torch
from torch.multiprocessing import ProcessRaisedException
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from retinamask_d2 import InputError, get_retinamask_cfg
from retinamask_d2.checkpoint import AtomicDetectionCheckpointer
from retinamask_d2.config import check_batch_size, config_sets
from retinamask_d2.data import check_datasets, dataset_num_classes, drop_invalid_annotations
from retinamask_d2.data import prepare_synthetic_datasets, register_coco_datasets
from retinamask_d2.evaluation import build_coco_evaluator


def create_ddp_model(model):
    """
    detectron2's create_ddp_model, also for replicas on the CPU: detectron2 passes
    device_ids=[local rank], which DistributedDataParallel rejects for a module on the CPU.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    return d2_create_ddp_model(
        model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {})
    )


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ with two changes it has no hook for: the create_ddp_model
        # above, and a checkpointer whose files are complete whenever they exist, so that a run
        # killed at any moment resumes with --resume.
        super(DefaultTrainer, self).__init__()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model)
        trainer = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # Sec. 3.5: box AP on all detections, mask AP on the top NUM_MASKS_TEST.
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_coco_evaluator(cfg, dataset_name, output_folder)


def build_config(args):
    """The config of the run, after registering the datasets of --register-coco."""
    register_coco_datasets(args.register_coco)
    cfg = get_retinamask_cfg(args.config_file, args.opts)
    key = "MODEL.RETINANET.NUM_CLASSES"
    if args.register_coco and not config_sets(args.config_file, args.opts, key):
        cfg.MODEL.RETINANET.NUM_CLASSES = dataset_num_classes(args.register_coco[0][0])
    if args.drop_invalid_annotations:
        drop_invalid_annotations([*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST])
    cfg.freeze()
    return cfg


def check(cfg, args):
    """Stop before any process starts on a bad batch size or bad datasets."""
    check_batch_size(cfg, args.num_gpus * args.num_machines)
    names = [*cfg.DATASETS.TEST, *(() if args.eval_only else cfg.DATASETS.TRAIN)]
    prepare_synthetic_datasets(names)
    check_datasets(names, cfg.MODEL.RETINANET.NUM_CLASSES)


def setup(args):
    """Each process's config and logs; a spawned process registers the datasets again."""
    cfg = build_config(args)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retinamask_d2")
    if cfg.MODEL.DEVICE == "cpu" and comm.get_local_size() > 1:
        # Processes on one machine share its cores; each taking all of them is ~10x slower.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // comm.get_local_size()))
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
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


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    try:
        check(build_config(args), args)
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except InputError as e:
        sys.exit(f"ERROR: {e}")
    except ProcessRaisedException as e:
        # An InputError of a spawned process arrives as the text of its traceback.
        error = str(e).strip().splitlines()[-1]
        if not error.startswith(f"{InputError.__module__}.InputError: "):
            raise
        sys.exit(f"ERROR: {error.split(': ', 1)[1]}")
