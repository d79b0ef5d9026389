"""RetinaNetDetector: metrics, parameter counts against torchvision, backbone checkpoints, freezing."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import timm
import torch
from helpers.detection_helpers import crowd_and_empty_set
from torch import nn
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d  # what timm.layers.freeze_batch_norm_2d builds

from aa_lightning.data.coco import COCODataModule
from aa_lightning.tasks import RetinaNetDetector
from aa_lightning.tasks.detection import NormalizePadTransform

TINY = dict(backbone="resnet18", fpn_channels=32, freeze_at=0, frozen_bn=False)
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.mask"),  # pycocotools vs numpy 2
    pytest.mark.usefixtures("one_thread"),  # conftest.py
]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Fixed(nn.Module):
    """Stands in for the RetinaNet: returns fixed detections (in the resized image's pixels)."""

    def __init__(self, detections):
        super().__init__()
        self.detections = detections

    def forward(self, images):
        return self.detections


def _eval_batch():
    # one image resized from 100x200 (H x W) to 50x100: predictions come back x2 to the original
    target = {
        "orig_boxes": torch.tensor([[20.0, 10.0, 80.0, 60.0], [100.0, 20.0, 180.0, 90.0], [0.0, 0.0, 40.0, 40.0]]),
        "labels": torch.tensor([0, 1, 1]),
        "iscrowd": torch.tensor([0, 0, 1]),
        "area": torch.tensor([3000.0, 5600.0, 1600.0]),
        "orig_size": torch.tensor([100, 200]),
        "size": torch.tensor([50, 100]),
    }
    target["boxes"] = target["orig_boxes"] / 2
    return [torch.zeros(3, 50, 100)], [target]


def _map_of(detector, boxes, labels, scores):
    detector.model = _Fixed([{"boxes": boxes, "labels": labels, "scores": scores}])
    detector._evaluate(_eval_batch(), detector.val_map)
    result = detector.val_map.compute()
    detector.val_map.reset()
    return result


def test_map_is_one_for_perfect_and_less_for_shifted_predictions():
    detector = RetinaNetDetector(num_classes=2, **TINY)
    perfect = torch.tensor([[10.0, 5.0, 40.0, 30.0], [50.0, 10.0, 90.0, 45.0]])  # resized-image pixels
    labels, scores = torch.tensor([0, 1]), torch.tensor([0.9, 0.8])
    result = _map_of(detector, perfect, labels, scores)
    assert result["map"] == pytest.approx(1.0) and result["map_50"] == pytest.approx(1.0)
    # a detection inside the crowd region is ignored, as COCO does
    in_crowd = torch.cat([perfect, torch.tensor([[2.0, 2.0, 18.0, 18.0]])])
    result = _map_of(detector, in_crowd, torch.tensor([0, 1, 1]), torch.tensor([0.9, 0.8, 0.95]))
    assert result["map"] == pytest.approx(1.0)
    # shifted by 4 px in the resized image (8 px in the original): IoU 0.6-0.8 -> AP50 stays 1, AP drops
    shifted = _map_of(detector, perfect + 4.0, labels, scores)
    assert shifted["map_50"] == pytest.approx(1.0) and 0.0 < shifted["map"] < 0.9
    assert shifted["map_75"] < 1.0
    wrong_class = _map_of(detector, perfect, 1 - labels, scores)
    assert wrong_class["map"] == pytest.approx(0.0)


def test_parameter_count_equals_torchvision_retinanet_resnet50_fpn():
    ours = RetinaNetDetector(num_classes=91, backbone="resnet50", freeze_at=0, frozen_bn=False)
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)  # trainable BN
    assert n_params(ours.model) == n_params(reference)
    # with frozen BN (BN weights become buffers): torchvision's published count of its COCO model
    with pytest.warns(UserWarning, match="freeze a randomly initialized backbone"):
        frozen = RetinaNetDetector(num_classes=91, backbone="resnet50", freeze_at=0, frozen_bn=True)
    assert n_params(frozen.model) == 34_014_999
    # P6 from C5 (Lin et al.) instead of P5: one 3x3 conv takes 2048 instead of 256 inputs
    c5 = RetinaNetDetector(num_classes=91, backbone="resnet50", freeze_at=0, frozen_bn=False, p6p7_from="c5")
    assert n_params(c5.model) - n_params(ours.model) == (2048 - 256) * 256 * 9


def test_freeze_at_and_frozen_bn():
    with pytest.warns(UserWarning, match="freeze a randomly initialized backbone"):
        detector = RetinaNetDetector(num_classes=3, backbone="resnet18", fpn_channels=32, freeze_at=2, frozen_bn=False)
    body = detector.model.backbone.body
    assert not any(p.requires_grad for m in (body.conv1, body.layer1) for p in m.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer2[0].bn1, nn.BatchNorm2d)
    with pytest.warns(UserWarning):
        all_frozen = RetinaNetDetector(num_classes=3, backbone="resnet18", fpn_channels=32, freeze_at=0, frozen_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in all_frozen.model.backbone.body.modules())
    with pytest.raises(ValueError, match="freeze_at"):
        RetinaNetDetector(num_classes=3, backbone="resnet18", freeze_at=7)


def test_input_transform_pads_and_normalizes_without_resizing():
    transform = NormalizePadTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    images, _ = transform([torch.full((3, 50, 70), 0.75), torch.full((3, 33, 40), 0.25)])
    assert images.tensors.shape == (2, 3, 64, 96) and images.image_sizes == [(50, 70), (33, 40)]
    assert torch.all(images.tensors[0, :, :50, :70] == 1.0) and torch.all(images.tensors[1, :, :33, :40] == -1.0)
    assert torch.all(images.tensors[0, :, 50:, :] == 0)


def test_detections_are_in_input_pixels():
    detector = RetinaNetDetector(num_classes=2, score_thresh=0.0, **TINY).eval()
    with torch.no_grad():
        (det,) = detector([torch.rand(3, 45, 77)])
    assert det["boxes"].shape[1] == 4 and len(det["boxes"]) > 0
    assert det["boxes"][:, 2].max() <= 77 and det["boxes"][:, 3].max() <= 45


def _fake_classifier_checkpoint(path, model_name, with_name=True):
    model = timm.create_model(model_name, num_classes=10)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    ckpt = {"state_dict": state, "epoch": 3, "pytorch-lightning_version": "2.6.6"}
    if with_name:
        ckpt["hyper_parameters"] = {"model_name": model_name, "num_classes": 10, "model_kwargs": None}
    torch.save(ckpt, path)
    return model


def test_backbone_from_classification_checkpoint(tmp_path):
    classifier = _fake_classifier_checkpoint(tmp_path / "cls.ckpt", "resnet18")
    detector = RetinaNetDetector(num_classes=2, backbone_checkpoint=str(tmp_path / "cls.ckpt"), **TINY)
    body = detector.model.backbone.body
    assert torch.equal(body.conv1.weight, classifier.conv1.weight)
    assert torch.equal(body.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)
    assert torch.equal(body.layer3[0].bn1.running_var, classifier.layer3[0].bn1.running_var)


def test_checkpoint_of_another_model_fails_naming_both(tmp_path):
    _fake_classifier_checkpoint(tmp_path / "r18.ckpt", "resnet18")
    with pytest.raises(ValueError, match=r"r18.ckpt.*'resnet18'.*'resnet34'"):
        RetinaNetDetector(num_classes=2, backbone="resnet34", backbone_checkpoint=str(tmp_path / "r18.ckpt"))
    _fake_classifier_checkpoint(tmp_path / "unnamed.ckpt", "resnet18", with_name=False)
    with pytest.raises(ValueError, match=r"unnamed.ckpt.*does not fit the backbone 'resnet34'.*missing keys"):
        RetinaNetDetector(num_classes=2, backbone="resnet34", backbone_checkpoint=str(tmp_path / "unnamed.ckpt"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {}, "evil": pl.Callback()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"evil.ckpt.*weights_only"):
        RetinaNetDetector(num_classes=2, backbone_checkpoint=str(tmp_path / "evil.ckpt"), **TINY)


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="model.init_args.anchor_sizes"):
        RetinaNetDetector(num_classes=2, anchor_sizes=[32, 64], **TINY)
    with pytest.raises(ValueError, match="model.init_args.backbone.*no_such_net"):
        RetinaNetDetector(num_classes=2, backbone="no_such_net")
    with pytest.raises(ValueError, match="p6p7_from"):
        RetinaNetDetector(num_classes=2, backbone="resnet18", p6p7_from="p4")


def test_num_classes_must_match_the_data(tmp_path):
    crowd_and_empty_set(tmp_path, "train2017")
    crowd_and_empty_set(tmp_path, "val2017")
    dm = COCODataModule(
        root=str(tmp_path), batch_size=1, num_workers=0, train_min_size=64, eval_min_size=64, hflip_prob=0.0
    )
    wrong = RetinaNetDetector(num_classes=5, **TINY)
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with pytest.raises(ValueError, match=r"num_classes is 5 but the data set has 3 categories \(ids \[1, 5, 90\]\)"):
        trainer.fit(wrong, dm)


def test_overfits_a_few_synthetic_images(tmp_path):
    """40 AdamW steps on 4 generated images: the loss collapses and the boxes are found again."""
    from torchmetrics.detection import MeanAveragePrecision

    from aa_lightning.data.synthetic.coco import SyntheticCOCODataModule

    pl.seed_everything(0)
    dm = SyntheticCOCODataModule(
        root=str(tmp_path),
        num_train=4,
        num_val=1,
        image_size=64,
        min_object_size=8,
        batch_size=4,
        num_workers=0,
        train_min_size=64,
        eval_min_size=64,
        max_size=96,
        hflip_prob=0.0,
    )
    dm.prepare_data()
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    detector = RetinaNetDetector(num_classes=5, head_norm="group", anchor_sizes=[8, 16, 32, 64, 128], **TINY)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=3e-3)
    detector.train()
    losses = []
    for _ in range(40):
        loss = sum(detector.model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    detector.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    with torch.no_grad():
        metric.update(detector(images), targets)
    assert metric.compute()["map_50"] > 0.8


def _ddp_map_worker(rank: int, world_size: int, port: int, preds: list, targets: list, out: dict) -> None:
    import torch.distributed as dist

    from aa_lightning.tasks.detection_metrics import DistributedMeanAveragePrecision

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        metric = DistributedMeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        mine = [i for i in range(len(preds)) if i % world_size == rank]  # 3 images on rank 0, 2 on rank 1
        metric.update([preds[i] for i in mine], [targets[i] for i in mine])
        out[rank] = {k: float(v) for k, v in metric.compute().items() if v.numel() == 1}
    finally:
        dist.destroy_process_group()


def test_map_gathered_over_uneven_ddp_shards_equals_one_process():
    """torchmetrics gathers MAP states one image at a time, which breaks when processes hold
    different numbers of images; DistributedMeanAveragePrecision gathers whole lists."""
    import socket

    import torch.multiprocessing as mp
    from torchmetrics.detection import MeanAveragePrecision

    generator = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for _ in range(5):
        xy = torch.rand(4, 2, generator=generator) * 60
        boxes = torch.cat([xy, xy + 10 + torch.rand(4, 2, generator=generator) * 30], dim=1)
        labels = torch.randint(0, 3, (4,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
        noisy = boxes + torch.randn(4, 4, generator=generator) * 3
        preds.append({"boxes": noisy, "labels": labels, "scores": torch.rand(4, generator=generator)})
    reference = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    reference.update(preds, targets)
    expected = {k: float(v) for k, v in reference.compute().items() if v.numel() == 1}
    assert 0.1 < expected["map"] < 0.95  # a non-trivial value, so that a lost or doubled image shows

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_map_worker, args=(2, port, preds, targets, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        for key in ("map", "map_50", "map_75", "mar_100"):
            assert results[rank][key] == pytest.approx(expected[key], abs=1e-9), (rank, key)


def test_channels_last_computes_the_same_network():
    torch.manual_seed(0)
    plain = RetinaNetDetector(num_classes=3, **TINY).eval()
    nhwc = RetinaNetDetector(num_classes=3, channels_last=True, **TINY).eval()
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.model.head.classification_head.cls_logits.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        features_a, features_b = plain.model.backbone(x), nhwc.model.backbone(x)
        for level in features_a:
            torch.testing.assert_close(features_b[level], features_a[level], rtol=1e-4, atol=1e-5)
        heads_a = plain.model.head(list(features_a.values()))
        heads_b = nhwc.model.head(list(features_b.values()))
    for key in heads_a:
        torch.testing.assert_close(heads_b[key], heads_a[key], rtol=1e-4, atol=1e-5)


def test_backbone_from_a_timm_ema_checkpoint(tmp_path):
    """The detector reads checkpoints with the model zoo's reader: timm's EMA weights under DDP's prefix too."""
    classifier = timm.create_model("resnet18", num_classes=10)
    torch.save({"state_dict_ema": {f"module.{k}": v for k, v in classifier.state_dict().items()}}, tmp_path / "ema.pth")
    detector = RetinaNetDetector(num_classes=2, backbone_checkpoint=str(tmp_path / "ema.pth"), **TINY)
    assert torch.equal(detector.model.backbone.body.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)
