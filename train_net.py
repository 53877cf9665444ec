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
import weakref

import torch
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from retinamask_d2 import build_test_resize
from retinamask_d2.checkpoint import AtomicDetectionCheckpointer
from retinamask_d2.engine import argument_parser, build_config, check_before_launch
from retinamask_d2.engine import create_ddp_model, leaves_process_group, one_line_errors
from retinamask_d2.evaluation import build_coco_evaluator


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ with two changes it has no hook for: a create_ddp_model that
        # also works on the CPU, and a checkpointer whose files are complete whenever they
        # exist, so that a run killed at any moment resumes with --resume.
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
    def build_test_loader(cls, cfg, dataset_name):
        # The config's test-time resize (MODEL.RETINAMASK.TEST_RESIZE), as Predictor's.
        mapper = DatasetMapper(cfg, is_train=False, augmentations=[build_test_resize(cfg)])
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # Sec. 3.5: box AP on all detections, mask AP on the top NUM_MASKS_TEST.
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_coco_evaluator(cfg, dataset_name, output_folder)


def setup(args):
    cfg = build_config(args)  # registers the datasets of --register-coco in this process too
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


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    with one_line_errors():
        check_before_launch(build_config(args), args)
        launch(
            leaves_process_group(main),
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
