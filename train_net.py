#!/usr/bin/env python
"""
Train and evaluate RetinaMask with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/retinamask_R50.yaml --num-gpus 8
    python train_net.py --config-file configs/retinamask_R50.yaml --eval-only MODEL.WEIGHTS W
    python train_net.py --config-file configs/retinamask_R50.yaml --num-gpus 8 --resume

On a machine without a GPU, ``--num-gpus N MODEL.DEVICE cpu`` trains on N CPU processes.
"""
import os

import detectron2.engine.defaults as d2_defaults
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from retinamask_d2 import add_retinamask_config
from retinamask_d2.checkpoint import AtomicDetectionCheckpointer
from retinamask_d2.data import load_checked_dataset
from retinamask_d2.evaluation import build_coco_evaluator


def _create_ddp_model(model, **kwargs):
    # detectron2 passes device_ids=[local rank], which DistributedDataParallel rejects for a
    # module on the CPU; CPU replicas need device_ids=None.
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = d2_defaults.create_ddp_model


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__ wraps the model with the module-level create_ddp_model.
        d2_defaults.create_ddp_model = _create_ddp_model
        try:
            super().__init__(cfg)
        finally:
            d2_defaults.create_ddp_model = _d2_create_ddp_model

    def build_hooks(self):
        # DefaultTrainer.__init__ creates self.checkpointer just before calling this, and the
        # PeriodicCheckpointer built here keeps it: swap in one whose files are never left
        # half-written, so that a run killed at any moment resumes with --resume.
        self.checkpointer = AtomicDetectionCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, **self.checkpointer.checkpointables
        )
        return super().build_hooks()

    @classmethod
    def build_train_loader(cls, cfg):
        # Fail before training, with the file and the fix, rather than in a loader worker.
        for name in cfg.DATASETS.TRAIN:
            load_checked_dataset(name, cfg.MODEL.RETINANET.NUM_CLASSES)
        return build_detection_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        load_checked_dataset(dataset_name, cfg.MODEL.RETINANET.NUM_CLASSES)
        return build_detection_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        # Sec. 3.5: box AP on all detections, mask AP on the top NUM_MASKS_TEST.
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_coco_evaluator(cfg, dataset_name, output_folder)


def setup(args):
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(
            f"Config file {args.config_file!r} (--config-file) does not exist. Pass the path of "
            "a YAML config, e.g. configs/synthetic/retinamask_synthetic.yaml; the shipped ones "
            "are under configs/."
        )
    cfg = get_cfg()
    add_retinamask_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup logs detectron2 and fvcore only; this package's messages (dataset
    # generation progress among them) go to the same console and log file.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retinamask_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
