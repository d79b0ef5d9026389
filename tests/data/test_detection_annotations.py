"""COCO annotation files that would train or evaluate something else than they say are refused at setup, naming
the file and the entry (issue 22): duplicate image ids (item 12), booleans taken as numbers (item 13), an
annotation whose category the model does not predict (item 15, was a KeyError mid-validation)."""

from __future__ import annotations

import json

import pytest
from helpers.detection_helpers import write_coco_split

from aa_lightning.data.coco import COCODataModule, load_coco_annotations

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
IMAGES = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 60, "height": 40} for i in (1, 2)]
GOOD = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10], "area": 200.0, "iscrowd": 0}


def datamodule(root) -> COCODataModule:
    return COCODataModule(root=str(root), batch_size=2, num_workers=0, train_min_size=40, eval_min_size=40)


def test_duplicate_image_ids_name_the_file_the_id_and_both_files(tmp_path):
    images = [{"id": i, "file_name": f"{n:012d}.jpg", "width": 60, "height": 40} for n, i in enumerate((1, 2, 1, 3, 4))]
    path = write_coco_split(tmp_path, "train2017", images, [GOOD], CATEGORIES)
    message = (
        rf"^{path}: image id 1 is used by 2 entries of 'images' \(000000000000.jpg, 000000000002.jpg\); "
        r"image ids must be unique"
    )
    with pytest.raises(ValueError, match=message):
        load_coco_annotations(path)
    write_coco_split(tmp_path, "val2017", IMAGES, [GOOD], CATEGORIES)
    with pytest.raises(ValueError, match=message):
        datamodule(tmp_path).setup("fit")


def test_duplicate_annotation_ids_name_the_file_and_the_id(tmp_path):
    path = write_coco_split(tmp_path, "val2017", IMAGES, [GOOD, {**GOOD, "image_id": 2}], CATEGORIES)
    with pytest.raises(ValueError, match=rf"^{path}: annotation id 1 is used by 2 annotations; .* must be unique"):
        load_coco_annotations(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bbox": [True, True, 30, 25]}, r"annotation 1: 'bbox' must be \[x, y, width, height\] \(4 finite numbers"),
        ({"bbox": [10, 5, 20, False]}, r"annotation 1: 'bbox' must be \[x, y, width, height\] \(4 finite numbers"),
        ({"image_id": True}, r"annotation 1: image_id True is not an integer"),
        ({"category_id": True}, r"annotation 1: category_id True is not an integer"),
    ],
)
def test_booleans_in_annotations_are_not_numbers(tmp_path, change, message):
    path = write_coco_split(tmp_path, "train2017", IMAGES, [{**GOOD, **change}], CATEGORIES)
    with pytest.raises(ValueError, match=rf"^{path}: {message}"):
        load_coco_annotations(path)


@pytest.mark.parametrize("key", ["id", "width", "height"])
def test_booleans_in_images_are_not_numbers(tmp_path, key):
    path = write_coco_split(tmp_path, "train2017", IMAGES, [GOOD], CATEGORIES)
    data = json.loads(path.read_text())
    data["images"][0][key] = True
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{path}: image 000000000001.jpg: '{key}' must be an integer; got True"):
        load_coco_annotations(path)


def test_a_validation_category_the_model_does_not_predict_is_an_error_at_setup(tmp_path):
    """The val file declares category 3 and an annotation uses it; training's file (the model's classes) has 1, 2."""
    write_coco_split(tmp_path, "train2017", IMAGES, [GOOD], CATEGORIES)
    val = write_coco_split(
        tmp_path,
        "val2017",
        IMAGES,
        [GOOD, {**GOOD, "id": 9, "image_id": 2, "category_id": 3}],
        [*CATEGORIES, {"id": 3, "name": "c"}],
    )
    with pytest.raises(
        ValueError,
        match=rf"^{val}: annotation 9: category_id 3 is not one of the categories the model predicts \(\[1, 2\]",
    ):
        datamodule(tmp_path).setup("fit")


def test_splits_declaring_other_categories_are_refused(tmp_path):
    write_coco_split(tmp_path, "train2017", IMAGES, [GOOD], CATEGORIES)
    val = write_coco_split(tmp_path, "val2017", IMAGES, [GOOD], [*CATEGORIES, {"id": 3, "name": "c"}])
    with pytest.raises(ValueError, match=rf"^{val} has category ids \[1, 2, 3\], which differ from the other split's"):
        datamodule(tmp_path).setup("fit")
