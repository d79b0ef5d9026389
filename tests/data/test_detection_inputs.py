"""Detection inputs that cannot train or evaluate fail naming the file and why (issue 12, item 9):
no usable training box, no ground truth to evaluate, invalid boxes reported, bad anchors."""

from __future__ import annotations

import warnings

import pytest
from helpers.detection_helpers import crowd_and_empty_set, write_coco_split

from aa_lightning.data.coco import COCODataModule
from aa_lightning.tasks.detection import RetinaNetDetector

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
IMAGES = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 60, "height": 40} for i in (1, 2)]
GOOD = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10], "area": 200.0, "iscrowd": 0}
OUTSIDE = {"id": 2, "image_id": 1, "category_id": 2, "bbox": [70, 5, 20, 10], "area": 200.0, "iscrowd": 0}  # x > width
NEGATIVE = {"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 10, -5, 8], "area": 40.0, "iscrowd": 0}


def datamodule(root, **kwargs) -> COCODataModule:
    return COCODataModule(root=str(root), batch_size=2, num_workers=0, train_min_size=40, eval_min_size=40, **kwargs)


@pytest.mark.parametrize(
    "annotations, why",
    [
        ([], r"'annotations' is empty for its 2 images"),
        (
            [OUTSIDE, NEGATIVE],
            r"2 annotations: 2 with no area inside their image; "
            r"e.g. annotation 2: bbox \[70, 5, 20, 10\] in the 60x40 image 000000000001.jpg",
        ),
    ],
)
def test_no_usable_training_box_names_the_file_and_why(tmp_path, annotations, why):
    write_coco_split(tmp_path, "train2017", IMAGES, annotations, CATEGORIES)
    crowd_and_empty_set(tmp_path, "val2017")
    with pytest.raises(ValueError, match=rf"instances_train2017.json: no training image has a usable box \({why}\)"):
        datamodule(tmp_path).setup("fit")


@pytest.mark.parametrize(
    "annotations, why",
    [
        ([], r"'annotations' is empty for its 2 images"),
        (
            [{**GOOD, "iscrowd": 1}, NEGATIVE],
            r"2 annotations: 1 crowd \(iscrowd=1\), 1 with no area inside their image",
        ),
    ],
)
def test_evaluation_split_without_ground_truth_is_an_error(tmp_path, annotations, why):
    write_coco_split(tmp_path, "train2017", IMAGES, [GOOD], CATEGORIES)
    write_coco_split(tmp_path, "val2017", IMAGES, annotations, CATEGORIES)
    write_coco_split(tmp_path, "test2017", IMAGES, annotations, CATEGORIES)
    with pytest.raises(
        ValueError,
        match=rf"data.val_split 'val2017': .*instances_val2017.json has no usable ground "
        rf"truth \({why}.*\), so its mAP would be -1",
    ):
        datamodule(tmp_path).setup("fit")
    with pytest.raises(ValueError, match=r"data.test_split 'test2017': .*instances_test2017.json has no usable"):
        datamodule(tmp_path, test_split="test2017").setup("test")


def test_invalid_boxes_are_counted_and_reported_once_per_split(tmp_path):
    write_coco_split(tmp_path, "train2017", IMAGES, [GOOD, OUTSIDE, NEGATIVE], CATEGORIES)
    write_coco_split(tmp_path, "val2017", IMAGES, [GOOD, NEGATIVE], CATEGORIES)
    dm = datamodule(tmp_path)  # test_split defaults to val2017
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
        dm.setup("test")
        dm.setup("fit")
    messages = sorted(str(w.message) for w in caught if "dropped" in str(w.message))
    assert len(messages) == 2, messages
    dropped = "boxes with no area inside their image (e.g. annotation"
    assert f"instances_train2017.json: dropped 2 of 3 {dropped} 2" in messages[0]
    assert f"instances_val2017.json: dropped 1 of 2 {dropped} 3" in messages[1]
    assert len(dm.train_set) == 1 and dm.train_set.box_counts["invalid"] == 2
    _, target = dm.val_set[1]  # image 2's only box is invalid: no boxes, as before
    assert target["boxes"].shape == (0, 4)


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("anchor_sizes", [0, 64, 128, 256, 512], "five positive base sizes"),
        ("anchor_sizes", [32, 64, -128, 256, 512], "five positive base sizes"),
        ("aspect_ratios", [0.5, 0.0], "positive height/width ratios"),
        ("anchor_scales_per_octave", 0, "an int >= 1"),
    ],
)
def test_non_positive_anchors_are_a_value_error(key, value, allowed):
    message = rf"model.init_args.{key}: expected {allowed}.*; got {value!r}".replace("[", r"\[")
    with pytest.raises(ValueError, match=message):
        RetinaNetDetector(num_classes=2, **{key: value})
