"""retinamask_d2.engine: what train_net.py adds to detectron2's entry points."""

import json
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import CONFIG_DIR
from retinamask_d2.engine import argument_parser, build_config


@pytest.fixture
def two_class_dataset(tmp_path):
    json_file = tmp_path / "two.json"
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    json_file.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    yield ["--register-coco", "engine_two", str(json_file), str(tmp_path)]
    DatasetCatalog.remove("engine_two")
    MetadataCatalog.remove("engine_two")


@pytest.mark.parametrize(
    "config, opts, num_classes",
    [
        # detectron2's default (80) is not set by the config: the JSON's 2 categories win.
        ("retinamask_R50.yaml", [], 2),
        # Set by the config, by a file of its _BASE_ chain or on the command line: kept.
        ("synthetic/retinamask_synthetic.yaml", [], 5),
        ("ablation/retinanet.yaml", [], 5),
        ("retinamask_R50.yaml", ["MODEL.RETINANET.NUM_CLASSES", "7"], 7),
    ],
)
def test_register_coco_sets_num_classes_unless_config_does(
    two_class_dataset, config, opts, num_classes
):
    args = argument_parser().parse_args(
        ["--config-file", os.path.join(CONFIG_DIR, config), *two_class_dataset, *opts]
    )
    assert build_config(args).MODEL.RETINANET.NUM_CLASSES == num_classes
