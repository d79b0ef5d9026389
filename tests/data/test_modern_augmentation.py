"""The per-sample modern augmentation of the classification data modules (issue 23; aa_lightning/data/augment.py):
RandAugment / AutoAugment / TrivialAugment, colour jitter and random erasing change training images only, every
draw comes from (seed, epoch, index) (any worker, any order of loading, the global generators untouched), RandAugment's
magnitude reaches its operations, random erasing erases one rectangle, and a bad setting names its key."""

import json
import random
import signal

import numpy as np
import pytest
import torch
from helpers.cli_helpers import aa_recipe, run_cli
from PIL import Image

from aa_lightning.data import (
    CIFAR100DataModule,
    ImageNetDataModule,
    StreamingImageNetDataModule,
    SyntheticCIFARDataModule,
)
from aa_lightning.data.augment import AugmentSettings, SeededLibraryStep
from aa_lightning.data.cifar_format import write_cifar100
from aa_lightning.data.transforms import CIFAR100_MEAN, CIFAR100_STD, cifar_train_transform

RAND = "rand-m9-mstd0.5-inc1"
#: every option alone (the names a recipe uses), each against the same module without it
EACH_OPTION = {
    "randaugment": {"auto_augment": RAND},
    "autoaugment": {"auto_augment": "autoaugment"},
    "autoaugment-cifar": {"auto_augment": "autoaugment-cifar"},
    "trivialaugment": {"auto_augment": "trivialaugment"},
    "color_jitter": {"color_jitter": 0.4},
    "erasing-const": {"random_erasing": 1.0},
    "erasing-rand": {"random_erasing": 1.0, "random_erasing_mode": "rand"},
    "erasing-pixel": {"random_erasing": 1.0, "random_erasing_mode": "pixel", "random_erasing_count": 3},
}
#: all libraries at once: timm's (Python + numpy generators) and torchvision's (torch's generator)
EVERYTHING = {"color_jitter": 0.4, "random_erasing": 0.5, "random_erasing_mode": "pixel"}


def _photos(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: smooth colour fields with grain (plain noise hides contrast, equalize, colour)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3))
        images.append(pixels.clip(0, 255).astype(np.uint8))
    return np.stack(images)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("modern_cifar")
    splits = {"train": (_photos(24), np.arange(24) % 4), "test": (_photos(8, seed=1), np.arange(8) % 4)}
    write_cifar100(root, splits, [f"c{i}" for i in range(4)], [0, 0, 1, 1], ("a", "b"))
    return root


def _cifar(cifar_dir, num_workers: int = 0, **augment) -> CIFAR100DataModule:
    module = CIFAR100DataModule(
        data_dir=str(cifar_dir), batch_size=4, num_workers=num_workers, download=False, seed=3, **augment
    )
    module.setup("fit")
    return module


def _training_samples(module, epoch: int, indices) -> list[torch.Tensor]:
    """Sample ``index`` of ``epoch`` as the training loader's workers load it (:class:`SeededSamples` keys)."""
    seeded = module.train_dataloader().dataset
    return [seeded[epoch * len(seeded) + i][0] for i in indices]


@pytest.mark.parametrize("option", EACH_OPTION, ids=list(EACH_OPTION))
def test_each_augmentation_changes_training_images_and_never_evaluation_images(cifar_dir, option):
    plain, augmented = _cifar(cifar_dir), _cifar(cifar_dir, **EACH_OPTION[option])
    # the same seed draws the same crops and flips: what differs is the option's doing
    before, after = _training_samples(plain, 1, range(12)), _training_samples(augmented, 1, range(12))
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after))
    assert changed >= (12 if "erasing" in option else 4), changed
    for split in ("val_set", "test_set"):
        for i in range(len(getattr(plain, split))):
            torch.testing.assert_close(getattr(augmented, split)[i][0], getattr(plain, split)[i][0], rtol=0, atol=0)
    assert repr(augmented.val_set.transform) == repr(plain.val_set.transform)


def test_imagenet_modules_augment_training_and_not_evaluation(tmp_path):
    for seed, (split, label, count) in enumerate(
        [("train", "n01", 3), ("train", "n02", 3), ("val", "n01", 2), ("val", "n02", 2)]
    ):
        (tmp_path / split / label).mkdir(parents=True)
        for i, pixels in enumerate(_photos(count, size=48, seed=seed)):
            Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.JPEG", quality=95)
    modules = []
    for augment in ({}, {"auto_augment": RAND, **EVERYTHING, "random_erasing": 1.0}):
        module = ImageNetDataModule(data_dir=str(tmp_path), batch_size=2, num_workers=0, train_size=32, **augment)
        module.setup("fit")
        modules.append(module)
    for i in range(len(modules[0].val_set)):
        assert torch.equal(modules[0].val_set[i][0], modules[1].val_set[i][0])
    before, after = _training_samples(modules[0], 0, range(6)), _training_samples(modules[1], 0, range(6))
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    steps = [type(step) for step in modules[1].train_set.transform.pipeline.transforms]
    assert steps.count(SeededLibraryStep) == 3 and SeededLibraryStep not in map(
        type, modules[1].val_set.transform.pipeline.transforms
    )


def test_the_streamed_module_augments_training_shards_and_not_validation(tmp_path):
    pytest.importorskip("litdata")
    from helpers.streaming_helpers import write_tree

    from aa_lightning.data.augment import SeededLibraryStep as Step
    from aa_lightning.data.prepare import convert_imagenet

    write_tree(tmp_path / "src", {"train": 4, "val": 2}, ["n01", "n02"], size=40)
    convert_imagenet(tmp_path / "src", tmp_path / "shards", num_workers=1, chunk_bytes="8KB", verbose=False)
    batches = {}
    for name, augment in (("plain", {}), ("modern", {"auto_augment": RAND, **EVERYTHING, "random_erasing": 1.0})):
        module = StreamingImageNetDataModule(
            data_dir=str(tmp_path / "shards"), batch_size=4, num_workers=0, train_size=32, eval_size=32, **augment
        )
        module.setup("fit")
        steps = [type(step) for step in module.train_set.transform[0].transform.pipeline.transforms]
        assert steps.count(Step) == (3 if augment else 0)
        assert Step not in [type(step) for step in module.val_set.transform[0].transform.pipeline.transforms]
        loaders = module.train_dataloader(), module.val_dataloader()
        batches[name] = [torch.cat([images for images, _ in loader]) for loader in loaders]
    (plain_train, plain_val), (modern_train, modern_val) = batches["plain"], batches["modern"]
    assert plain_train.shape == modern_train.shape and not torch.equal(plain_train, modern_train)  # erasing p=1
    assert torch.equal(plain_val, modern_val)  # validation: untouched


def test_the_streamed_module_takes_the_same_settings():
    module = StreamingImageNetDataModule(data_dir="s3://bucket/shards", auto_augment=RAND, **EVERYTHING)
    assert module.augment == AugmentSettings(auto_augment=RAND, **EVERYTHING)
    assert module.hparams.auto_augment == RAND and module.hparams.random_erasing_mode == "pixel"
    assert StreamingImageNetDataModule(data_dir="s3://bucket/shards").augment == AugmentSettings()


@pytest.mark.parametrize("auto_augment", [RAND, "autoaugment", "autoaugment-cifar", "trivialaugment"])
def test_a_sample_has_the_same_pixels_whichever_worker_loads_it_and_whatever_came_before(cifar_dir, auto_augment):
    settings = {"auto_augment": auto_augment, **EVERYTHING}
    batches = {}
    for workers in (0, 2):
        loader = _cifar(cifar_dir, num_workers=workers, **settings).train_dataloader()
        loader.sampler.set_epoch(2)
        batches[workers] = torch.cat([images for images, _ in loader])
    torch.testing.assert_close(batches[2], batches[0], rtol=0, atol=0)  # 2 workers: every other batch each

    # a resume: a fresh module loads samples of epoch 2 directly, in another order, after other epochs' samples
    module = _cifar(cifar_dir, **settings)
    loader = module.train_dataloader()
    loader.sampler.set_epoch(2)
    order = [int(key) % len(module.train_set) for key in loader.sampler]
    _training_samples(module, 0, range(5))
    resumed = _training_samples(module, 2, order[::-1])[::-1]
    torch.testing.assert_close(torch.stack(resumed)[: len(batches[0])], batches[0], rtol=0, atol=0)
    other_epoch = _training_samples(module, 3, order)[: len(batches[0])]
    assert sum(not torch.equal(a, b) for a, b in zip(other_epoch, batches[0])) >= len(batches[0]) // 2


@pytest.mark.parametrize("auto_augment", [RAND, "autoaugment", "autoaugment-cifar", "trivialaugment"])
def test_loading_a_sample_leaves_the_global_generators_as_they_were(cifar_dir, auto_augment):
    module = _cifar(cifar_dir, auto_augment=auto_augment, **EVERYTHING)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    expected = random.random(), np.random.random(), torch.rand(1).item()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    _training_samples(module, 0, range(8))
    assert len(list(module.train_dataloader())) == 6
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


@pytest.mark.parametrize(
    "bad", ["rand-mx", "randaugment", "rand-m9-foo1", "rand-m9-tcolour", "autoaugment-imagenet", ""]
)
@pytest.mark.parametrize("module", [CIFAR100DataModule, SyntheticCIFARDataModule, ImageNetDataModule])
def test_a_bad_auto_augment_string_names_the_key_and_the_allowed_forms(bad, module):
    with pytest.raises(ValueError, match="data.init_args.auto_augment") as info:
        module(auto_augment=bad)
    for form in ("rand-m9-mstd0.5-inc1", "'autoaugment'", "'autoaugment-cifar'", "'trivialaugment'", repr(bad)):
        assert form in str(info.value)
    with pytest.raises(ValueError, match="data.init_args.auto_augment"):
        StreamingImageNetDataModule(data_dir="s3://bucket/shards", auto_augment=bad)


@pytest.mark.parametrize(
    "setting, allowed",
    [
        ({"random_erasing": 1.5}, r"random_erasing must be a probability in \[0, 1\]"),
        ({"random_erasing_mode": "zero"}, "random_erasing_mode must be one of const, rand, pixel"),
        ({"random_erasing_count": 0}, "random_erasing_count must be an integer >= 1"),
        ({"color_jitter": -0.1}, "color_jitter must be >= 0"),
    ],
)
def test_bad_erasing_and_jitter_values_name_their_key(setting, allowed):
    with pytest.raises(ValueError, match=f"data.init_args.{allowed}"):
        CIFAR100DataModule(**setting)


def test_a_recipe_with_a_bad_auto_augment_stops_at_start_up_naming_the_key(tmp_path):
    result = run_cli("--config", str(aa_recipe(tmp_path, auto_augment="rand-m9-bogus")), cwd=tmp_path)
    assert result.returncode != 0
    assert "data.init_args.auto_augment must be" in result.stderr and "'rand-m9-bogus'" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def _augmented(image: np.ndarray, augment: AugmentSettings, seeds) -> np.ndarray:
    """The normalized training image [n, 3, H, W] of ``image`` under ``augment`` alone (no crop, no flip)."""
    transform = cifar_train_transform(pad=0, hflip=False, augment=augment)
    out = []
    for seed in seeds:
        transform.set_random_seed(seed)
        out.append(transform(image).numpy())
    return np.stack(out)


def test_rand_augment_magnitude_reaches_the_operations():
    image, seeds = _photos(1)[0], range(40)
    plain = _augmented(image, AugmentSettings(), seeds)
    # every sample applies both of its two operations (p1.0); the same seeds choose the same operations
    weak = _augmented(image, AugmentSettings(auto_augment="rand-m0-n2-p1.0-inc1"), seeds)
    strong = _augmented(image, AugmentSettings(auto_augment="rand-m9-n2-p1.0-inc1"), seeds)
    differ = [not np.array_equal(w, s) for w, s in zip(weak, strong)]
    assert sum(differ) >= 30, sum(differ)  # only AutoContrast / Equalize / Invert ignore the magnitude
    assert np.abs(strong - plain).mean() > 2 * np.abs(weak - plain).mean()


@pytest.mark.parametrize("size", [32, 57])
def test_random_erasing_with_p1_erases_one_rectangle_of_the_allowed_area(size):
    image = _photos(1, size=size)[0]
    seeds = range(30)
    plain = _augmented(image, AugmentSettings(), seeds)
    areas = []
    for mode in ("const", "rand", "pixel"):
        erased = _augmented(image, AugmentSettings(random_erasing=1.0, random_erasing_mode=mode), seeds)
        for before, after in zip(plain, erased):
            changed = (before != after).any(axis=0)
            rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            np.testing.assert_array_equal(after[:, ~changed], before[:, ~changed])  # nothing outside the box
            inside = after[:, box[0], box[1]]
            h, w = inside.shape[1:]
            if mode == "const":
                assert changed[box].all() and (inside == 0).all()  # zeros after normalization: the mean colour
            elif mode == "rand":
                assert (inside == inside[:, :1, :1]).all()  # one colour per box
            else:
                assert len(np.unique(inside)) > h * w  # noise per pixel
            areas.append(h * w / size**2)
            # timm: area 2%-1/3 of the image, h and w rounded from it, the box strictly inside the image
            assert h < size and w < size
            assert 0.02 * size**2 - (h + w) <= h * w <= size**2 / 3 + (h + w)
    assert min(areas) < 0.1 and max(areas) > 0.2  # the area is drawn, not fixed


def test_rand_augment_at_its_top_magnitude_posterizes_to_black_instead_of_failing():
    # timm asks Pillow for 0 bits at magnitude 10 with inc1; Pillow 13 raises there, Pillow < 13 gave black
    image = _photos(1)[0]
    out = _augmented(image, AugmentSettings(auto_augment="rand-m10-n2-p1.0-inc1"), range(120))
    black = np.array([-m / s for m, s in zip(CIFAR100_MEAN, CIFAR100_STD)], dtype=np.float32).reshape(3, 1, 1)
    assert any(np.allclose(sample, black, atol=1e-5) for sample in out)
    _augmented(image, AugmentSettings(auto_augment="rand-m1-n2-p1.0"), range(60))  # 0 bits at low magnitude too


@pytest.mark.slow
def test_a_run_with_the_modern_augmentation_killed_mid_epoch_resumes_bit_for_bit(tmp_path):
    """train.py with RandAugment, colour jitter and erasing, SIGKILLed after step 7 and resumed from last.ckpt: every
    later step sees the uninterrupted run's pixels, and the final weights are the same bit for bit."""
    augment = {"auto_augment": RAND, **EVERYTHING}

    def probe(report, **kill):
        return [{"class_path": "helpers.fault_probes.StepProbe", "init_args": {"report": str(report), **kill}}]

    def records(report):
        return {line["step"]: line for line in map(json.loads, report.read_text().splitlines())}

    runs = {}
    for name in ("reference", "killed"):
        folder = tmp_path / name
        folder.mkdir()
        report = folder / "steps.jsonl"
        kill = {"kill_at": 7} if name == "killed" else {}
        recipe = aa_recipe(folder, callbacks=probe(report, **kill), **augment)
        result = run_cli("--config", str(recipe), cwd=folder, probes=True, fresh_process=bool(kill))
        if kill:
            assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
            recipe = aa_recipe(folder, callbacks=probe(report), **augment)
            result = run_cli("--config", str(recipe), "--ckpt_path", "last", cwd=folder, probes=True)
        assert result.returncode == 0, result.stderr[-3000:]
        last = folder / "runs" / "tiny_aa" / "version_0" / "checkpoints" / "last.ckpt"
        runs[name] = records(report), torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    (reference, reference_weights), (resumed, resumed_weights) = runs["reference"], runs["killed"]
    assert set(resumed) == set(reference) == set(range(1, 11))
    for step in range(7, 11):
        assert resumed[step] == reference[step], step
    assert reference_weights.keys() == resumed_weights.keys()
    for key in reference_weights:
        assert torch.equal(reference_weights[key], resumed_weights[key]), key


def test_by_default_the_training_pipeline_is_the_one_without_the_options(cifar_dir):
    """Off = today's pipeline: pad + crop + flip + normalize, the same pixels for the same (seed, epoch, index)."""
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    from aa_lightning.data.transforms import AlbumentationsTransform

    today = AlbumentationsTransform(
        [
            A.PadIfNeeded(40, 40, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(32, 32),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=CIFAR100_MEAN, std=CIFAR100_STD, max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
    module = _cifar(cifar_dir)
    assert module.augment == AugmentSettings() and not AugmentSettings().image_steps(32, CIFAR100_MEAN)
    assert not AugmentSettings().normalized_steps()
    plain_function = cifar_train_transform()
    for seed in range(6):
        image = module.train_set.images[seed]
        outputs = []
        for transform in (module.train_set.transform, today, plain_function):
            transform.set_random_seed(seed)
            outputs.append(transform(image))
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[2], outputs[1])


def test_the_augmenting_pipeline_survives_pickling_for_spawned_workers():
    import pickle

    transform = cifar_train_transform(augment=AugmentSettings(auto_augment=RAND, **EVERYTHING))
    copy = pickle.loads(pickle.dumps(transform))
    image = _photos(1)[0]
    for seed in range(4):
        transform.set_random_seed(seed)
        copy.set_random_seed(seed)
        assert torch.equal(transform(image), copy(image))
