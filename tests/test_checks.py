import json
import os
import re

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode
from PIL import Image

from retinamask_d2.config import InputError
from retinamask_d2.data import (
    check_datasets,
    dataset_num_classes,
    drop_invalid_annotations,
    load_checked_dataset,
    register_coco_datasets,
)

WIDTH, HEIGHT = 40, 30


def write_coco(directory, annotations=(), num_images=2, categories=(1, 2, 3), extension="png"):
    """
    A COCO instances file and its images (PNG unless ``extension`` says) under ``directory``.
    Each annotation is a valid 10x8 box with its rectangle polygon on image 1, updated with the
    given dict; ids count from 1 unless given.

    Returns:
        (json_file, image_root, coco dict)
    """
    image_root = os.path.join(directory, "images")
    os.makedirs(image_root, exist_ok=True)
    images = []
    for i in range(num_images):
        file_name = f"image_{i + 1}.{extension}"
        pixels = np.random.RandomState(i).randint(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(image_root, file_name))
        images.append({"id": i + 1, "file_name": file_name, "width": WIDTH, "height": HEIGHT})
    full = []
    for i, annotation in enumerate(annotations):
        full.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [2, 3, 10, 8],
                "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
                "area": 80,
                "iscrowd": 0,
                **annotation,
            }
        )
    coco = {
        "images": images,
        "annotations": full,
        "categories": [{"id": c, "name": f"class_{c}"} for c in categories],
    }
    json_file = os.path.join(directory, "annotations.json")
    with open(json_file, "w") as f:
        json.dump(coco, f)
    return json_file, image_root, coco


@pytest.fixture
def register(tmp_path):
    """Register a COCO file written by the test (content or dict); unregistered afterwards."""
    names = []

    def register(content, image_root=None):
        name = f"checks_test_{len(names)}"
        directory = tmp_path / name
        _, default_root, _ = write_coco(str(directory))
        json_file = str(directory / "annotations.json")
        with open(json_file, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        register_coco_instances(name, {}, json_file, image_root or default_root)
        names.append(name)
        return name, json_file

    yield register
    _unregister(names)


@pytest.fixture
def registered_names():
    """Names a test registers itself; unregistered afterwards."""
    names = []
    yield names
    _unregister(names)


def _unregister(names):
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def _invalid_dataset(tmp_path):
    """Two valid annotations (ids 1, 4) and three invalid ones (ids 2, 3, 5)."""
    return write_coco(
        str(tmp_path),
        [
            {},
            {"segmentation": [[2, 3, 12, 3]]},
            {"category_id": 7},
            {"image_id": 2},
            {"bbox": [2, 3, 0, 8]},
        ],
    )


# ------------------------------------------------------------------------------------------------
# The checks of files and images.
# ------------------------------------------------------------------------------------------------


def test_json_that_does_not_parse(register):
    name, _ = register('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(InputError, match=r"checks_test_0.*not valid JSON.*line 2, column"):
        load_checked_dataset(name, 5)


def test_missing_json(register):
    name, json_file = register("{}")
    os.remove(json_file)
    with pytest.raises(InputError, match=r"annotations\.json of dataset .checks_test_0. does not"):
        load_checked_dataset(name, 5)


def test_dataset_without_images(register, tmp_path):
    _, root, coco = write_coco(str(tmp_path), num_images=0)
    name, _ = register(coco, root)
    with pytest.raises(InputError, match=r"has no images.*annotations\.json"):
        load_checked_dataset(name, 5)


def test_missing_and_empty_image_files(register, tmp_path):
    _, root, coco = write_coco(str(tmp_path), num_images=3)
    coco["images"][1]["file_name"] = "does_not_exist.png"
    name, _ = register(coco, root)
    with pytest.raises(InputError, match=r"missing: .*does_not_exist\.png"):
        load_checked_dataset(name, 5)

    (tmp_path / "empty.png").write_bytes(b"")
    coco["images"][1]["file_name"] = str(tmp_path / "empty.png")
    name, _ = register(coco, root)
    with pytest.raises(InputError, match=r"empty: .*empty\.png"):
        load_checked_dataset(name, 5)


def _truncate(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize("extension", ["png", "jpg"])
def test_every_image_is_decoded(register, tmp_path, extension):
    # The third image of four: a check of the first image only would pass. Its last tenth is
    # missing, which only a decoder that reads the whole file sees.
    _, root, coco = write_coco(str(tmp_path), [{}], num_images=4, extension=extension)
    _truncate(tmp_path / "images" / f"image_3.{extension}", 0.9)
    name, _ = register(coco, root)
    with pytest.raises(InputError) as info:
        check_datasets([name], 3)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"1 image file(s) of dataset '{name}' (")
    assert re.search(rf"cannot be decoded: \S*image_3\.{extension} \(.+\)\. Replace them", message)
    assert "image_1" not in message and "image_4" not in message


def test_undecodable_images_are_counted(register, tmp_path):
    _, root, coco = write_coco(str(tmp_path), num_images=8)
    (tmp_path / "images" / "image_2.png").write_bytes(b"not an image")
    for i in range(3, 9):
        _truncate(tmp_path / "images" / f"image_{i}.png", 0.5)
    name, _ = register(coco, root)
    with pytest.raises(InputError, match=r"^7 image file\(s\) of dataset") as info:
        check_datasets([name], 3)
    message = str(info.value)
    assert re.search(r"image_2\.png \(cannot identify image file .*\); \S*image_3\.png", message)
    assert "image_7" not in message and "; and 2 more." in message


def test_category_ids_outside_the_model_classes(register, tmp_path):
    _, root, coco = write_coco(str(tmp_path), [{"category_id": 3}])
    name, _ = register(coco, root)
    with pytest.raises(
        InputError,
        match=r"category id 3 \(class index 2\), outside \[0, 2\).*MODEL\.RETINANET\.NUM_CLASSES",
    ):
        load_checked_dataset(name, 2)
    assert len(load_checked_dataset(name, 3)) == 2


def test_training_needs_an_image_with_an_object(register, tmp_path):
    # detectron2's loader drops images without a non-crowd object; none left is an AssertionError.
    _, root, coco = write_coco(str(tmp_path), [{"iscrowd": 1}])
    name, _ = register(coco, root)
    check_datasets([name], 3)  # evaluation alone needs no objects
    with pytest.raises(InputError, match=r"No image of DATASETS.TRAIN \('checks_test_0',\) has an"):
        check_datasets([name], 3, training=(name,))
    _, root, coco = write_coco(str(tmp_path / "with_object"), [{}])
    other, _ = register(coco, root)
    check_datasets([name, other], 3, training=(name, other))


def test_unregistered_name():
    with pytest.raises(InputError, match="'no_such_dataset' is not registered. Register it with"):
        load_checked_dataset("no_such_dataset", 5)
    # A misspelling of a registered name is named with it, not with every registered name.
    close = r"'coco_2017_vall' is not registered\. Did you mean 'coco_2017_val'\?"
    with pytest.raises(InputError, match=close) as error:
        load_checked_dataset("coco_2017_vall", 5)
    assert "coco_2014_train" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# Invalid annotations, each named with its image file and annotation id.
# ------------------------------------------------------------------------------------------------


def _problems(register, tmp_path, annotations):
    _, root, coco = write_coco(str(tmp_path), annotations)
    name, _ = register(coco, root)
    with pytest.raises(InputError) as info:
        check_datasets([name], 3)
    message = str(info.value)
    assert "\n" not in message and "--drop-invalid-annotations" in message
    return message


def test_degenerate_polygons(register, tmp_path):
    message = _problems(
        register,
        tmp_path,
        [
            {},
            {"segmentation": [[2, 3, 12, 3]]},
            {"segmentation": [[2, 3, 12, 3, 12, 11, 2, 11], [2, 3]]},
            {"segmentation": [[2, 3, 7, 7, 12, 11]]},
        ],
    )
    assert "has 3 invalid annotation(s)" in message
    assert "image image_1.png annotation 2: polygon of 2 point(s)" in message
    assert "image image_1.png annotation 3: polygon of 1 point(s)" in message
    assert "image image_1.png annotation 4: polygon of zero area" in message


def test_boxes_without_width_or_height(register, tmp_path):
    message = _problems(register, tmp_path, [{"bbox": [2, 3, 0, 8]}, {"bbox": [2, 3, 10, -1]}])
    assert "annotation 1: box [2, 3, 0, 8] has a width or height <= 0" in message
    assert "annotation 2: box [2, 3, 10, -1] has a width or height <= 0" in message


def test_boxes_outside_the_image(register, tmp_path):
    message = _problems(
        register,
        tmp_path,
        [
            {"bbox": [41, 3, 5, 5], "image_id": 2},
            {"bbox": [-8, 3, 5, 5]},
            {"bbox": [30, 3, 11.5, 5]},
            {"bbox": [30.5, 20, 10, 10.5]},  # half a pixel beyond: kept
        ],
    )
    assert "has 3 invalid annotation(s)" in message
    assert "image image_2.png annotation 1: box [41, 3, 5, 5] lies outside the 40x30" in message
    assert "annotation 2: box [-8, 3, 5, 5] lies outside" in message
    assert "annotation 3: box [30, 3, 11.5, 5] extends more than a pixel beyond" in message


def test_category_id_not_in_categories(register, tmp_path):
    # load_coco_json raises a KeyError that names neither the image nor the annotation.
    message = _problems(register, tmp_path, [{}, {"category_id": 7, "image_id": 2}])
    assert "image image_2.png annotation 2: category id 7 is not in 'categories'" in message


def test_many_invalid_annotations_are_counted(register, tmp_path):
    message = _problems(register, tmp_path, [{"bbox": [2, 3, 0, 8]}] * 7)
    assert "has 7 invalid annotation(s)" in message
    assert len(re.findall(r"image image_1\.png annotation \d+: box", message)) == 5
    assert "; and 2 more." in message


# ------------------------------------------------------------------------------------------------
# Dropping invalid annotations.
# ------------------------------------------------------------------------------------------------


def test_drop_removes_exactly_the_invalid_annotations(tmp_path, registered_names):
    json_file, image_root, _ = _invalid_dataset(tmp_path)
    register_coco_instances("checks_drop", {}, json_file, image_root)
    registered_names.append("checks_drop")

    assert drop_invalid_annotations(["checks_drop"]) == {"checks_drop": 3}
    dicts = load_checked_dataset("checks_drop", 3)
    assert [len(record["annotations"]) for record in dicts] == [1, 1]
    assert [record["annotations"][0]["bbox"] for record in dicts] == [[2, 3, 10, 8]] * 2
    metadata = MetadataCatalog.get("checks_drop")
    assert metadata.thing_classes == ["class_1", "class_2", "class_3"]
    assert metadata.image_root == image_root and "json_file" not in metadata.as_dict()


def test_drop_again_gives_the_same_dataset(tmp_path, registered_names):
    json_file, image_root, _ = _invalid_dataset(tmp_path)
    register_coco_instances("checks_drop", {}, json_file, image_root)
    registered_names.append("checks_drop")
    drop_invalid_annotations(["checks_drop"])
    first = DatasetCatalog.get("checks_drop")

    assert drop_invalid_annotations(["checks_drop"]) == {"checks_drop": 3}
    assert DatasetCatalog.get("checks_drop") == first


def test_drop_keeps_a_valid_dataset_as_registered(tmp_path, registered_names):
    json_file, image_root, _ = write_coco(str(tmp_path), [{}, {"image_id": 2}])
    register_coco_instances("checks_valid", {}, json_file, image_root)
    registered_names.append("checks_valid")

    assert drop_invalid_annotations(["checks_valid"]) == {"checks_valid": 0}
    assert MetadataCatalog.get("checks_valid").json_file == json_file


def test_evaluation_ground_truth_has_no_dropped_annotation(tmp_path, registered_names):
    # A polygon of 2 points in the file makes pycocotools fail in the final evaluation.
    json_file, image_root, _ = _invalid_dataset(tmp_path)
    register_coco_instances("checks_drop", {}, json_file, image_root)
    registered_names.append("checks_drop")
    drop_invalid_annotations(["checks_drop"])

    evaluator = COCOEvaluator("checks_drop", output_dir=str(tmp_path / "inference"))
    annotations = evaluator._coco_api.loadAnns(evaluator._coco_api.getAnnIds())
    assert [a["bbox"] for a in annotations] == [[2.0, 3.0, 10.0, 8.0]] * 2


# ------------------------------------------------------------------------------------------------
# Registration and the number of classes.
# ------------------------------------------------------------------------------------------------


def test_register_coco_datasets(tmp_path, registered_names):
    json_file, image_root, _ = write_coco(str(tmp_path), [{}])
    registered_names.append("checks_own")
    register_coco_datasets([("checks_own", json_file, image_root)])
    # Again with the same files, as every process of a launch does.
    register_coco_datasets([("checks_own", json_file, image_root)])

    assert len(load_checked_dataset("checks_own", 3)) == 2
    assert MetadataCatalog.get("checks_own").json_file == json_file


def test_register_under_a_builtin_name(tmp_path):
    json_file, image_root, _ = write_coco(str(tmp_path))
    with pytest.raises(InputError, match="'coco_2017_val' is a built-in dataset name.*another"):
        register_coco_datasets([("coco_2017_val", json_file, image_root)])
    assert MetadataCatalog.get("coco_2017_val").json_file != json_file


def test_register_missing_files(tmp_path):
    json_file, image_root, _ = write_coco(str(tmp_path))
    missing = str(tmp_path / "missing")
    with pytest.raises(InputError, match=re.escape(f"Annotation file {missing} of --register")):
        register_coco_datasets([("checks_own", missing, image_root)])
    with pytest.raises(InputError, match=re.escape(f"Image directory {missing} of --register")):
        register_coco_datasets([("checks_own", json_file, missing)])
    assert "checks_own" not in DatasetCatalog.list()


def test_register_the_same_name_twice(tmp_path):
    json_file, image_root, _ = write_coco(str(tmp_path))
    with pytest.raises(InputError, match="'checks_own' is given to --register-coco more than"):
        register_coco_datasets([("checks_own", json_file, image_root)] * 2)


def test_builtin_name_keeps_its_classes(tmp_path):
    # Replacing a built-in dataset behind its name: MetadataCatalog keeps COCO's 80 classes.
    json_file, image_root, _ = write_coco(str(tmp_path), [{}])
    builtin = DatasetCatalog["coco_2017_val"]
    DatasetCatalog.remove("coco_2017_val")
    DatasetCatalog.register(
        "coco_2017_val", lambda: load_coco_json(json_file, image_root, "coco_2017_val")
    )
    try:
        with pytest.raises(
            InputError, match="'coco_2017_val' already has other classes.*under a new name"
        ) as info:
            load_checked_dataset("coco_2017_val", 3)
        assert "\n" not in str(info.value)
    finally:
        DatasetCatalog.remove("coco_2017_val")
        DatasetCatalog.register("coco_2017_val", builtin)


def test_dataset_num_classes_from_the_json(tmp_path, registered_names):
    json_file, image_root, _ = write_coco(str(tmp_path), [{"category_id": 9}], categories=(2, 9))
    registered_names.append("checks_own")
    register_coco_datasets([("checks_own", json_file, image_root)])

    assert dataset_num_classes("checks_own") == 2
    with pytest.raises(InputError, match="'no_such_dataset' is not registered"):
        dataset_num_classes("no_such_dataset")


def test_register_again_after_drop(tmp_path, registered_names):
    # With one process, train_net.py registers and drops in the parent and again in main().
    json_file, image_root, _ = _invalid_dataset(tmp_path)
    registered_names.append("checks_own")
    register_coco_datasets([("checks_own", json_file, image_root)])
    drop_invalid_annotations(["checks_own"])

    register_coco_datasets([("checks_own", json_file, image_root)])
    assert drop_invalid_annotations(["checks_own"]) == {"checks_own": 3}


def test_dataset_without_a_json_file(tmp_path, registered_names):
    # A dataset with its own loader is checked on its dicts; annotations without id by index.
    _, image_root, _ = write_coco(str(tmp_path))
    record = {"file_name": os.path.join(image_root, "image_1.png"), "image_id": 1}
    record.update(width=WIDTH, height=HEIGHT)
    boxes = [[2, 3, 12, 11], [12, 3, 2, 11]]
    record["annotations"] = [
        {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0} for box in boxes
    ]
    DatasetCatalog.register("checks_loader", lambda: [record])
    registered_names.append("checks_loader")

    with pytest.raises(
        InputError, match=r"1 invalid .*image_1\.png annotation #1: box \[12, 3, -10"
    ):
        check_datasets(["checks_loader"], 3)


def test_dataset_num_classes_before_dropping(tmp_path, registered_names):
    # train_net.py counts the classes of --register-coco before --drop-invalid-annotations.
    json_file, image_root, _ = _invalid_dataset(tmp_path)
    registered_names.append("checks_own")
    register_coco_datasets([("checks_own", json_file, image_root)])

    assert dataset_num_classes("checks_own") == 3
