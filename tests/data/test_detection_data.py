"""COCO data for detection: category mapping, box transforms, crowd/empty handling, errors, the synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.detection_helpers import crowd_and_empty_set
from pycocotools.coco import COCO

from aa_lightning.data.coco import (
    CategoryMapping,
    COCODataModule,
    COCODetection,
    collate_detection,
    load_coco_annotations,
)
from aa_lightning.data.detection_transforms import detection_eval_transform, detection_train_transform
from aa_lightning.data.synthetic.coco import CATEGORIES, generate_synthetic_coco


def test_category_mapping_round_trips_non_contiguous_ids():
    mapping = CategoryMapping(
        [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]
    )
    assert [mapping.to_label(i) for i in (1, 5, 90)] == [0, 1, 2]
    assert [mapping.to_category_id(label) for label in range(3)] == [1, 5, 90]
    assert mapping.names == ["person", "airplane", "toothbrush"]
    with pytest.raises(KeyError, match="category id 2"):
        mapping.to_label(2)
    with pytest.raises(KeyError, match="label 3"):
        mapping.to_category_id(3)


def _run(transform, image_hw, boxes):
    out = transform(
        image=np.zeros((*image_hw, 3), np.uint8),
        bboxes=np.asarray(boxes, np.float32),
        labels=list(range(len(boxes))),
        ann_index=list(range(len(boxes))),
    )
    return tuple(out["image"].shape[-2:]), np.asarray(out["bboxes"])


def test_boxes_survive_resize_and_flip_hand_computed():
    # 100x200 image, shorter side -> 50: scale 0.5 -> 50x100; box [20,10,40,30] -> [10,5,20,15];
    # horizontal flip on width 100: x -> 100 - (10 + 20) = 70
    size, boxes = _run(detection_train_transform(50, 1000, hflip_prob=1.0, seed=0), (100, 200), [[20, 10, 40, 30]])
    assert size == (50, 100)
    np.testing.assert_allclose(boxes, [[70, 5, 20, 15]], atol=1e-4)
    # the longer-side cap wins: 100x400, min 200 / max 600 -> scale min(2, 1.5) = 1.5 -> 150x600
    size, boxes = _run(detection_eval_transform(200, 600), (100, 400), [[40, 20, 60, 40]])
    assert size == (150, 600)
    np.testing.assert_allclose(boxes, [[60, 30, 90, 60]], atol=1e-4)
    # small image upscaled to the shorter side (torchvision's rule), no cap reached: 40x60 -> 80x120
    size, boxes = _run(detection_eval_transform(80, 1333), (40, 60), [[0, 0, 60, 40]])
    assert size == (80, 120)
    np.testing.assert_allclose(boxes, [[0, 0, 120, 80]], atol=1e-4)


def test_multiscale_training_draws_each_size():
    transform = detection_train_transform([32, 48], 1000, hflip_prob=0.0, seed=3)
    sizes = {_run(transform, (16, 16), np.zeros((0, 4)))[0] for _ in range(20)}
    assert sizes == {(32, 32), (48, 48)}


def test_crowd_boxes_and_empty_images_as_coco(tmp_path):
    ann = crowd_and_empty_set(tmp_path)
    train = COCODetection(tmp_path / "val2017", ann, detection_train_transform(40, 1000, hflip_prob=0.0), train=True)
    assert train.ids == [1]  # image 2 (crowd only) and 3 (no annotation) are not trainable
    _, target = train[0]
    assert target["labels"].tolist() == [1]  # category 5 -> label 1; the crowd box is dropped
    np.testing.assert_allclose(target["boxes"].numpy(), [[10, 5, 30, 15]], atol=1e-4)

    val = COCODetection(tmp_path / "val2017", ann, detection_eval_transform(80, 1000), train=False)
    assert val.ids == [1, 2, 3]
    image, target = val[0]
    assert image.shape == (3, 80, 120) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert target["iscrowd"].tolist() == [0, 1] and target["labels"].tolist() == [1, 2]
    np.testing.assert_allclose(target["orig_boxes"].numpy(), [[10, 5, 30, 15], [30, 20, 55, 35]])
    np.testing.assert_allclose(target["boxes"].numpy(), [[20, 10, 60, 30], [60, 40, 110, 70]], atol=1e-4)
    assert target["area"].tolist() == [150.0, 300.0]  # the annotation's area, not the box's
    assert target["orig_size"].tolist() == [40, 60] and target["size"].tolist() == [80, 120]
    _, empty = val[2]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)

    images, targets = collate_detection([val[0], val[2]])
    assert isinstance(images, list) and len(images) == len(targets) == 2


def test_malformed_annotation_file_names_the_file(tmp_path):
    bad = tmp_path / "instances_bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="instances_bad.json"):
        load_coco_annotations(bad)
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match=r"instances_bad.json.*annotations"):
        load_coco_annotations(bad)
    bad.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
                "categories": [{"id": 1, "name": "a"}],
                "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}],
            }
        )
    )
    with pytest.raises(ValueError, match=r"instances_bad.json: annotation 7: 'bbox'"):
        load_coco_annotations(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_coco_annotations(tmp_path / "nowhere.json")


def test_missing_or_corrupt_image_names_the_file(tmp_path):
    ann = crowd_and_empty_set(tmp_path)
    (tmp_path / "val2017" / "000000000002.jpg").unlink()
    (tmp_path / "val2017" / "000000000003.jpg").write_bytes(b"not a jpeg")
    val = COCODetection(tmp_path / "val2017", ann, detection_eval_transform(40, 100), train=False)
    with pytest.raises(FileNotFoundError, match="000000000002.jpg"):
        val[1]
    with pytest.raises(ValueError, match="000000000003.jpg"):
        val[2]


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(tmp_path):
    dm = COCODataModule(root=str(tmp_path / "coco"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"(?s)coco.*train2017.*cocodataset.org"):
        dm.setup("fit")


def test_datamodule_reads_non_contiguous_categories(tmp_path):
    crowd_and_empty_set(tmp_path, "train2017")
    crowd_and_empty_set(tmp_path, "val2017")
    dm = COCODataModule(root=str(tmp_path), batch_size=2, num_workers=0, train_min_size=40, eval_min_size=40)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.categories.category_ids == [1, 5, 90]
    images, targets = next(iter(dm.val_dataloader()))
    assert len(images) == 2 and [int(t["image_id"]) for t in targets] == [1, 2]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_synthetic_set_is_deterministic_exact_coco(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", num_train=6, num_val=3, image_size=64, min_object_size=8, seed=7)
    b = generate_synthetic_coco(tmp_path / "b", num_train=6, num_val=3, image_size=64, min_object_size=8, seed=7)
    c = generate_synthetic_coco(tmp_path / "c", num_train=6, num_val=3, image_size=64, min_object_size=8, seed=8)
    for split in ("train2017", "val2017"):
        ja = (a / "annotations" / f"instances_{split}.json").read_text()
        assert ja == (b / "annotations" / f"instances_{split}.json").read_text()
        assert ja != (c / "annotations" / f"instances_{split}.json").read_text()
        files = sorted(p.name for p in (a / split).iterdir())
        assert all((a / split / f).read_bytes() == (b / split / f).read_bytes() for f in files)
    coco = COCO(str(a / "annotations" / "instances_train2017.json"))  # pycocotools reads it as is
    assert sorted(coco.getCatIds()) == [c["id"] for c in CATEGORIES] == [1, 3, 5, 7, 9]
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) >= 6
    for ann in coco.loadAnns(coco.getAnnIds()):
        info = coco.imgs[ann["image_id"]]
        mask = coco.annToMask(ann)  # the polygon rasterized by pycocotools
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
        assert xs.max() < info["width"] and ys.max() < info["height"]
    # a second call with the same parameters reuses the files; other parameters regenerate
    stamp = (a / "train2017" / "000000000001.jpg").stat().st_mtime_ns
    generate_synthetic_coco(tmp_path / "a", num_train=6, num_val=3, image_size=64, min_object_size=8, seed=7)
    assert (a / "train2017" / "000000000001.jpg").stat().st_mtime_ns == stamp
    generate_synthetic_coco(tmp_path / "a", num_train=4, num_val=3, image_size=64, min_object_size=8, seed=7)
    assert len(list((a / "train2017").iterdir())) == 4
