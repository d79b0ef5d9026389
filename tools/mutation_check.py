"""Does the test suite catch a broken product? Apply deliberate breakages one at a time to a throw-away
copy of the repository and run the tests there; print a Markdown table of which were caught.

    python tools/mutation_check.py                       # every breakage, the default suite each time
    python tools/mutation_check.py --quick               # each breakage against its own test files only
    python tools/mutation_check.py --tests tests/training/test_cli.py tests/training/test_product_training.py
    python tools/mutation_check.py --only loss-times-zero val-split-overlaps --quick
    python tools/mutation_check.py --list

Not run by CI (it runs the suite once per breakage). The copy holds the repository's tracked and
untracked-but-not-ignored files (never ``runs/``, ``data/`` outputs or caches), so the working tree
is never modified; ``PYTHONPATH`` points at the copy, so the subprocesses of the CLI tests run the
broken code too. Before the breakages, the same tests run once on the unbroken copy: a failure there
stops the tool (every breakage would look "caught").

A breakage is a :class:`Breakage` in ``BREAKAGES``: a name, what it breaks, and one or more exact
text edits (file, old text, new text). An old text that is not in the file exactly once stops the
tool with an error naming the file and the entry, so an entry cannot rot silently when the code it
breaks is rewritten: update the entry. ``tests``: the test files that ought to catch it, run by
``--quick``. An entry with ``todo`` set is listed but not applied (code not written yet). An entry
with ``pytest_args`` (``-m slow``: only a test outside the default run can catch it) always runs its
own ``tests`` with them.

Exit status: 0 every applied breakage caught; 1 at least one survived; 2 a broken entry, or the
unbroken copy already fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edit:
    """Replace the one occurrence of ``old`` in ``file`` (relative to the repository root) with ``new``."""

    file: str
    old: str
    new: str


@dataclass(frozen=True)
class Breakage:
    name: str
    description: str
    edits: tuple[Edit, ...] = ()
    tests: tuple[str, ...] = ()
    todo: str | None = None  # why it is not applied yet; the row then reads TODO
    #: run ``tests`` with these pytest arguments in every mode (e.g. ``-m slow``: only a slow test can catch it)
    pytest_args: tuple[str, ...] = ()


def breakage(
    name: str, description: str, file: str, old: str, new: str, tests: Sequence[str] = (), more: Sequence[Edit] = ()
) -> Breakage:
    """A one-edit breakage (``more``: further edits applied together with it)."""
    return Breakage(name, description, (Edit(file, old, new), *more), tuple(tests))


CLASSIFICATION = "aa_lightning/tasks/classification.py"
ATTENTION = "aa_lightning/attention/functional.py"
TABLES = "aa_lightning/attention/tables.py"
EXPORTED = "aa_lightning/attention/exported.py"
AACONV = "aa_lightning/layers/augmented_conv.py"
CIFAR = "aa_lightning/data/cifar.py"
CIFAR_FORMAT = "aa_lightning/data/cifar_format.py"
COCO = "aa_lightning/data/coco.py"
FAULTS = "aa_lightning/training/faults.py"
STREAMING_LOADER = "aa_lightning/data/streaming_loader.py"
DATA_AUGMENT = "aa_lightning/data/augment.py"
MODERN_AUGMENTATION = "tests/data/test_modern_augmentation.py"
PREPARE = "aa_lightning/data/prepare.py"
AUGMENT = "aa_lightning/models/augmentation.py"
SETTINGS = "aa_lightning/models/attention_settings.py"
MODEL_TESTS = ("tests/models/test_models_settings.py", "tests/models/test_models_augment.py")
CLI = "aa_lightning/training/cli.py"

BREAKAGES: list[Breakage] = [
    breakage(
        "loss-times-zero",
        "the classification loss multiplied by 0 (nothing learns)",
        CLASSIFICATION,
        "        return loss\n\n    def _evaluate",
        "        return loss * 0\n\n    def _evaluate",
        ["tests/training/test_product_training.py", "tests/training/test_cli.py", "tests/tasks/test_classification.py"],
    ),
    breakage(
        "detection-loss-times-zero",
        "the RetinaNet loss multiplied by 0",
        "aa_lightning/tasks/detection.py",
        "        return loss\n\n    def _evaluate",
        "        return loss * 0\n\n    def _evaluate",
        ["tests/training/test_detection_cli.py", "tests/tasks/test_detection_model.py"],
    ),
    breakage(
        "relative-terms-dropped",
        "the relative logits dropped by the CPU default (cpu_kernel) and chunked backends",
        ATTENTION,
        'if rel_h is None and backend != "reference":',
        'if backend in ("chunked", "cpu_kernel") or (rel_h is None and backend != "reference"):',
        [
            "tests/attention/test_relative_attention.py",
            "tests/layers/test_augmented_conv.py",
            "tests/kernels/test_cpu_kernel.py",
        ],
    ),
    breakage(
        "rel-h-rel-w-swapped",
        "AugmentedConv2d passes rel_w as the height table and rel_h as the width table",
        AACONV,
        "relative_attention_2d(q, k, v, rel_h, rel_w, backend=self.backend)",
        "relative_attention_2d(q, k, v, rel_w, rel_h, backend=self.backend)",
        ["tests/layers/test_augmented_conv.py", "tests/attention/test_relative_attention.py"],
    ),
    Breakage(
        "h-w-swapped-in-relative-index",
        "the relative-offset index of the width table built over H and vice versa",
        (
            Edit(
                TABLES,
                "r_w = rel_w.to(q.dtype)[relative_offsets_index(w, q.device)]",
                "r_w = rel_w.to(q.dtype)[relative_offsets_index(h, q.device)]",
            ),
            Edit(
                TABLES,
                "r_h = rel_h.to(q.dtype)[relative_offsets_index(h, q.device)]",
                "r_h = rel_h.to(q.dtype)[relative_offsets_index(w, q.device)]",
            ),
        ),
        ("tests/attention/test_relative_attention.py", "tests/layers/test_augmented_conv.py"),
    ),
    breakage(
        "attention-not-concatenated",
        "AAConv's attention output zeroed (not concatenated)",
        AACONV,
        "return torch.cat([conv_out, attn], dim=1)",
        "return torch.cat([conv_out, attn * 0], dim=1)",
        ["tests/layers/test_augmented_conv.py", "tests/models/test_models.py"],
    ),
    breakage(
        "optimizer-step-skipped",
        "forward and backward run, the optimizer never steps",
        CLASSIFICATION,
        "    def configure_optimizers(self) -> dict[str, Any]:\n",
        "    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):\n"
        "        optimizer_closure()\n\n    def configure_optimizers(self) -> dict[str, Any]:\n",
        ["tests/training/test_product_training.py", "tests/training/test_cli.py", "tests/tasks/test_classification.py"],
    ),
    breakage(
        "lr-scaling-ignored",
        "the linear lr scaling (base_lr x global batch / 256) ignored: peak lr = base_lr",
        "aa_lightning/tasks/optim.py",
        "    return base_lr * global_batch / reference_batch_size, global_batch",
        "    return base_lr, global_batch",
        ["tests/tasks/test_classification.py", "tests/training/test_cli.py"],
    ),
    breakage(
        "warmup-ignored",
        "the linear warm-up skipped (full lr from step 0)",
        "aa_lightning/tasks/optim.py",
        "    if after == 0:\n        return main",
        "    if True:\n        return main",
        ["tests/tasks/test_classification.py"],
    ),
    breakage(
        "label-smoothing-ignored",
        "model.label_smoothing accepted but not applied",
        "aa_lightning/tasks/losses.py",
        "nn.CrossEntropyLoss(label_smoothing=label_smoothing)",
        "nn.CrossEntropyLoss()",
        ["tests/tasks/test_product_classification.py", "tests/tasks/test_classification.py"],
    ),
    breakage(
        "weight-decay-on-norms",
        "weight decay applied to BatchNorm weights and biases too",
        "aa_lightning/tasks/optim.py",
        "    return param_groups_weight_decay(model, weight_decay)[::-1]",
        '    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]',
        ["tests/tasks/test_classification.py"],
    ),
    Breakage(
        "ddp-metric-sync-off",
        "top-1 / top-5 not summed across DDP processes (each reports its own shard)",
        (
            Edit(
                CLASSIFICATION,
                '"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),',
                '"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", sync_on_compute=False),',
            ),
            Edit(
                CLASSIFICATION,
                '"top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),',
                '"top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", '
                "sync_on_compute=False),",
            ),
        ),
        ("tests/training/test_cli.py",),
    ),
    breakage(
        "ddp-eval-padded",
        "evaluation under DDP with the padding DistributedSampler (some images counted twice)",
        "aa_lightning/data/loaders.py",
        "sampler = UnrepeatedDistributedSampler(dataset,",
        "sampler = torch.utils.data.DistributedSampler(dataset,",
        ["tests/training/test_cli.py"],
    ),
    breakage(
        "val-split-overlaps-train",
        "half of the held-out validation images also trained on",
        CIFAR,
        "train_idx, val_idx = np.sort(order[n_val:]), np.sort(order[:n_val])",
        "train_idx, val_idx = np.sort(order[n_val // 2:]), np.sort(order[:n_val])",
        ["tests/data/test_product_data.py", "tests/data/test_data_cifar.py"],
    ),
    breakage(
        "val-augmented",
        "the validation images get the training augmentation (pad-crop, flip)",
        CIFAR,
        "self.val_set = ArrayImageDataset(images[val_idx], labels[val_idx], eval_transform)",
        "self.val_set = ArrayImageDataset(images[val_idx], labels[val_idx], train_transform)",
        ["tests/data/test_product_data.py", "tests/data/test_data_cifar.py"],
    ),
    breakage(
        "checkpoint-monitor-min",
        "the best checkpoint chosen by the lowest validation top-1",
        CLASSIFICATION,
        'checkpoint_monitor: tuple[str, str] = ("val/top1", "max")',
        'checkpoint_monitor: tuple[str, str] = ("val/top1", "min")',
        ["tests/training/test_cli.py"],
    ),
    breakage(
        "export-without-checkpoint-weights",
        "export / predict write the built model's initial weights (checkpoint not loaded)",
        "aa_lightning/predict.py",
        "        load_checkpoint(model, source)  # the model zoo's checks: same model, same shapes",
        "        pass  # the checkpoint is not loaded",
        ["tests/commands/test_export.py", "tests/commands/test_predict.py", "tests/commands/test_predict_cli.py"],
    ),
    breakage(
        "predict-ignores-checkpoint-mean-std",
        "predict normalizes with ImageNet's mean / std, not the ones the checkpoint records",
        "aa_lightning/predict.py",
        "    return create_transform(**classifier.preprocessing, is_training=False)(Image.fromarray(image))",
        "    config = {**classifier.preprocessing, 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225)}\n"
        "    return create_transform(**config, is_training=False)(Image.fromarray(image))",
        ["tests/commands/test_checkpoint_metadata.py", "tests/commands/test_predict.py"],
    ),
    breakage(
        "checkpoint-without-preprocessing",
        "training does not record the data module's preprocessing in the checkpoint",
        CLASSIFICATION,
        "            checkpoint[DATA_CONFIG_KEY] = dict(self.data_config)",
        "            pass",
        ["tests/commands/test_checkpoint_metadata.py", "tests/commands/test_predict_cli.py"],
    ),
    breakage(
        "checkpoint-without-class-names",
        "training does not record the class names in the checkpoint",
        CLASSIFICATION,
        "            checkpoint[CLASS_NAMES_KEY] = list(self.class_names)",
        "            pass",
        [
            "tests/commands/test_checkpoint_metadata.py",
            "tests/commands/test_predict.py",
            "tests/commands/test_predict_cli.py",
        ],
    ),
    breakage(
        "onnx-form-relative-sign-flipped",
        "the ONNX export form (backend onnx) reads r^W at offset ix - jx instead of jx - ix",
        EXPORTED,
        "r_w = rel_w[relative_offsets_index(w, device)].transpose(1, 2)",
        "r_w = rel_w[relative_offsets_index(w, device).t()].transpose(1, 2)",
        ["tests/attention/test_relative_attention.py", "tests/commands/test_export.py"],
    ),
    breakage(
        "onnx-form-width-table-by-query-row",
        "the ONNX export form picks the width table's rows by the query's row iy instead of its column ix",
        EXPORTED,
        "r_w.expand(h, w, d, w)",
        "r_w[:, None].expand(h, w, d, w)",
        ["tests/attention/test_relative_attention.py", "tests/commands/test_export.py"],
    ),
    breakage(
        "export-without-preprocessing",
        "the exported pretrained_cfg keeps the architecture's default preprocessing, not the checkpoint's",
        "aa_lightning/export.py",
        "        data_config=dict(classifier.preprocessing),",
        "        data_config=None,",
        ["tests/commands/test_checkpoint_metadata.py", "tests/commands/test_export.py"],
    ),
    breakage(
        "imagenet-preprocessing-without-resize",
        "the ImageNet data module records a center crop of the image without the resize to resize_size",
        "aa_lightning/data/imagenet.py",
        "        return eval_data_config(self.hparams.eval_size, self.hparams.resize_size, self.mean, self.std)",
        "        return eval_data_config(self.hparams.eval_size, self.hparams.eval_size, self.mean, self.std)",
        ["tests/commands/test_checkpoint_metadata.py"],
    ),
    breakage(
        "crop-pct-one-ulp-short",
        "crop_pct = eval / resize size as is: timm's floor(size / crop_pct) lands one pixel short for some sizes",
        "aa_lightning/data/transforms.py",
        "    while math.floor(image_size / crop_pct) < resize_size:",
        "    while False:",
        ["tests/commands/test_checkpoint_metadata.py"],
    ),
    breakage(
        "export-files-keep-library-mode",
        "the exported model.safetensors keeps safetensors' 0600 instead of the umask's mode",
        "aa_lightning/export.py",
        "            os.chmod(staging / name, new_file_mode())",
        "            pass",
        ["tests/commands/test_checkpoint_metadata.py"],
    ),
    breakage(
        "validation-uses-test-set",
        "a held-out validation split replaced by the test set",
        CIFAR,
        '        if stage in (None, "test") or (self.hparams.val_split == 0 and stage in ("fit", "validate")):',
        "        if True:",
        ["tests/data/test_product_data.py", "tests/data/test_data_cifar.py"],
        more=[
            Edit(
                CIFAR,
                "            if self.hparams.val_split == 0:\n                self.val_set = self.test_set",
                "            if True:\n                self.val_set = self.test_set",
            )
        ],
    ),
    Breakage(
        "compiled-attention-wrong-shape",
        "the CPU kernel's output shape under compile (fake): dkh wide, not dvh",
        (
            Edit(
                "aa_lightning/kernels/cpu/ops.py",
                "        q.new_empty(b, nh, h, w, dv, dtype=torch.float32),",
                "        q.new_empty(b, nh, h, w, d, dtype=torch.float32),",
            ),
        ),
        ("tests/models/test_product_compile.py",),
        pytest_args=("-m", "slow"),
    ),
    breakage(
        "tiled-bias-window-shifted",
        "the float32 kernel reads each query's relative-table window one offset off (W - ix, not W - 1 - ix)",
        "aa_lightning/kernels/cpu/factorized_attention_tiled.c",
        "        const float* wT = tab->wT + (W - 1 - i % W);",
        "        const float* wT = tab->wT + (W - i % W);",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    breakage(
        "bf16-exp-polynomial-wrong",
        "a wrong exp polynomial: the bfloat16 path's degree-3 coefficient of r^3 off by 10% (error 6e-4)",
        "aa_lightning/kernels/cpu/factorized_attention_tiled.c",
        "r * 5.500893e-2f + 2.4221098e-1f",
        "r * 4.950804e-2f + 2.4221098e-1f",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    breakage(
        "micro-tile-edge-skipped",
        "a wrong micro-tile edge: the float32 kernel's dK / dQ pass skips the last head dim when D % DB is 1",
        "aa_lightning/kernels/cpu/factorized_attention_tiled.c",
        "    if (d0 < D) dk_dq_block(",
        "    if (d0 + 1 < D) dk_dq_block(",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    breakage(
        "key-pair-odd-vector-skipped",
        "the float32 kernel's two-key-vectors-per-step logits (dkh >= 16) drop an odd last key vector",
        "aa_lightning/kernels/cpu/factorized_attention_tiled.c",
        "    for (; j < Lp; j += VW) logits_vector(",
        "    for (; j + VW < Lp; j += VW) logits_vector(",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    breakage(
        "key-pair-second-row-wrong",
        "the two-key-vectors-per-step logits give the second vector the first one's grid row bias",
        "aa_lightning/kernels/cpu/factorized_attention_tiled.c",
        "jy1 = (j + VW) / Wp, jx1",
        "jy1 = j / Wp, jx1",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    breakage(
        "cpu-grad-q-scale-dropped",
        "the tiled op's backward lays q's gradient out head dim first without the scale it folds into that pass",
        "aa_lightning/kernels/cpu/ops.py",
        "    torch.mul(grad_q.permute(0, 3, 1, 2), scale, out=grad_q_first)",
        "    grad_q_first.copy_(grad_q.permute(0, 3, 1, 2))",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    breakage(
        "cpu-saved-layout-of-k-for-v",
        "the tiled op's forward hands backward its layout of k where v's belongs (same shape when dkh = dvh)",
        "aa_lightning/kernels/cpu/ops.py",
        "    return out, lse, *inputs[:3]",
        "    return out, lse, inputs[0], inputs[1], inputs[1][:, : v.shape[4]].contiguous()",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    breakage(
        "low-precision-q-scaled-in-its-dtype",
        "bfloat16 / float16 q scaled in its own dtype before the kernel reads it (one more rounding)",
        "aa_lightning/kernels/cpu/ops.py",
        "        scaled.view(q.shape).copy_(q)\n        scaled.mul_(scale)",
        "        torch.mul(q, scale, out=scaled.view(q.shape))",
        ["tests/kernels/test_cpu_kernel.py"],
    ),
    breakage(
        "last-ckpt-not-rewritten",
        "last.ckpt written at the first save point and never rewritten",
        "aa_lightning/training/faults.py",
        "    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:\n"
        "        self.save_now(trainer)",
        "    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:\n"
        "        if not self.best_model_path:\n            self.save_now(trainer)",
        ["tests/training/test_resume.py", "tests/training/test_cli.py"],
    ),
    breakage(
        "generator-overwrites-foreign-folder",
        "a synthetic data generator takes a non-empty folder without its stamp for its own (and replaces it)",
        "aa_lightning/data/synthetic/generated.py",
        "        if found is None or not is_own_stamp(found):\n            raise ValueError(",
        "        if False:\n            raise ValueError(",
        ["tests/data/test_data_generators.py"],
        more=[
            Edit(
                "aa_lightning/data/synthetic/generated.py",
                "        foreign = _not_listed(root, _with_folders(files(found), stamp_name))",
                "        foreign = []",
            )
        ],
    ),
    breakage(
        "generator-removes-user-files-in-its-folders",
        "regenerating a synthetic set looks only at its top-level entries (a user's file in cifar-100-python/ goes)",
        "aa_lightning/data/synthetic/generated.py",
        "        dirnames[:] = [name for name in dirnames if (base / name).as_posix() in own]  # not into foreign ones",
        "        dirnames[:] = []",
        ["tests/data/test_data_generated_files.py"],
    ),
    breakage(
        "cifar-pixels-cast-unchecked",
        "CIFAR pixel arrays of any type are cast to uint8 (float [0, 1] turns black, 454 wraps to 198)",
        "aa_lightning/data/cifar_format.py",
        "    if array.dtype == np.uint8:\n        return array\n",
        "    if True:\n        return array.astype(np.uint8)\n",
        ["tests/data/test_data_cifar_arrays.py"],
    ),
    breakage(
        "cifar-labels-truncated",
        "fractional CIFAR labels (3.7) are cut to integers instead of refused",
        "aa_lightning/data/cifar_format.py",
        "        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):",
        "        if False:",
        ["tests/data/test_data_cifar_arrays.py"],
        more=[Edit(CIFAR_FORMAT, '        if value.dtype.kind not in "iu":', "        if False:")],
    ),
    breakage(
        "coco-duplicate-image-ids-accepted",
        "a repeated COCO image id is accepted (one image dropped, its boxes given to another file)",
        COCO,
        '    _check_unique_image_ids(path, data["images"])\n',
        "",
        ["tests/data/test_detection_annotations.py"],
    ),
    breakage(
        "coco-booleans-as-coordinates",
        "a COCO box [true, true, 30, 25] is read as [1, 1, 30, 25]",
        COCO,
        "return isinstance(value, (int, float)) and not isinstance(value, bool)",
        "return isinstance(value, (int, float))",
        ["tests/data/test_detection_annotations.py"],
    ),
    breakage(
        "coco-unpredicted-category-mid-epoch",
        "a validation annotation of a category the model does not predict passes setup (KeyError mid-validation)",
        COCO,
        'if ann["category_id"] not in self.categories.category_ids:',
        "if False:",
        ["tests/data/test_detection_annotations.py"],
    ),
    breakage(
        "coco-split-categories-unchecked",
        "the splits' declared categories are compared with the mapping itself (never differ)",
        COCO,
        "if dataset.file_categories.category_ids != self.categories.category_ids:",
        "if dataset.categories.category_ids != self.categories.category_ids:",
        ["tests/data/test_detection_annotations.py"],
    ),
    breakage(
        "folder-scan-follows-links-into-the-tree",
        "the class-folder scan follows a link back into its own tree (train/n01/loop -> ..: images read many times)",
        "aa_lightning/data/class_folders.py",
        "        if is_link and (_inside(real, top_real) or _inside(top_real, real)):",
        "        if False:",
        ["tests/data/test_data_image_folders.py"],
    ),
    breakage(
        "folder-scan-reads-a-folder-twice",
        "two links to one folder outside the tree: its images read under both classes",
        "aa_lightning/data/class_folders.py",
        "        if real in read:",
        "        if False:",
        ["tests/data/test_data_image_folders.py"],
    ),
    breakage(
        "empty-class-folder-unnamed",
        "an empty class folder is not reported (the class gets no image)",
        "aa_lightning/data/class_folders.py",
        "        if len(samples) == before:",
        "        if False:",
        ["tests/data/test_data_image_folders.py"],
    ),
    breakage(
        "folder-reader-without-the-scan",
        "the ImageNet folder reader uses torchvision's ImageFolder scan (follows link loops) for training",
        "aa_lightning/data/imagenet.py",
        "            self.train_set = ClassFolderImages(",
        "            self.train_set = ImageFolder(",
        ["tests/data/test_data_image_folders.py"],
    ),
    breakage(
        "streamed-resume-stays-in-restored-epoch",
        "a streamed run resumed mid-epoch never leaves litdata's restore mode (every later epoch runs 0 batches)",
        STREAMING_LOADER,
        "                self.restore = False\n",
        "                pass\n",
        ["tests/data/test_streaming_resume.py"],
    ),
    breakage(
        "streamed-resume-ignores-the-trainers-epoch",
        "a streamed resume in an epoch cut by limit_train_batches replays that epoch's rest as the next epoch",
        STREAMING_LOADER,
        "            if delivered or moved_on:",
        "            if delivered:",
        ["tests/data/test_streaming_resume.py"],
    ),
    breakage(
        "streamed-augmentation-not-seeded-per-sample",
        "streamed training samples are augmented from the pipeline's running generator, not from (seed, epoch, index)",
        STREAMING_LOADER,
        "        if isinstance(index, ChunkedIndex):\n",
        "        if False:\n",
        ["tests/data/test_streaming_resume.py"],
    ),
    breakage(
        "augment-libraries-not-seeded-per-sample",
        "RandAugment / AutoAugment / TrivialAugment / erasing draw from the process's global generators, not from "
        "(seed, epoch, index): workers and resumed runs augment differently",
        DATA_AUGMENT,
        "        with seeded_global_generators(global_seed, self.stream, self.numpy):\n"
        "            return self.function(img)",
        "        return self.function(img)",
        [MODERN_AUGMENTATION],
    ),
    breakage(
        "augment-leaves-the-global-generators-seeded",
        "loading a sample leaves numpy's global generator seeded by the augmentation (a user's stream changes)",
        DATA_AUGMENT,
        "            np.random.set_state(saved_numpy)\n",
        "            pass\n",
        [MODERN_AUGMENTATION],
    ),
    breakage(
        "augment-reaches-evaluation",
        "the CIFAR evaluation images get the training augmentation's steps (RandAugment, erasing, ...)",
        CIFAR,
        "        eval_transform = cifar_eval_transform(self.mean, self.std)",
        "        eval_transform = cifar_train_transform(pad=0, hflip=False, augment=self.augment)",
        [MODERN_AUGMENTATION],
    ),
    breakage(
        "converter-writes-class-by-class",
        "the shard converter writes the samples class by class (streamed batches hold one or two classes)",
        PREPARE,
        "        samples[split] = [samples[split][i] for i in order]\n",
        "        samples[split] = list(samples[split])\n",
        ["tests/data/test_streaming_shuffle.py"],
    ),
    breakage(
        "converter-takes-a-uri-out-for-a-folder",
        "prepare --out s3://bucket/x is turned into a Path before the URI check (writes ./s3:/bucket/x)",
        PREPARE,
        'if "://" in str(out):  # before Path()',
        'if "://" in str(Path(out)):  # before Path()',
        ["tests/data/test_streaming_converter_inputs.py"],
    ),
    breakage(
        "converter-empty-class-folder-traceback",
        "an empty class folder (or a link loop) stops the converter with a traceback instead of one line naming it",
        PREPARE,
        "        raise ConversionError(str(err)) from None",
        "        raise",
        ["tests/data/test_streaming_converter_inputs.py"],
    ),
    breakage(
        "converter-rerun-ignores-another-source",
        "a converter re-run into the finished conversion of another --src says 'nothing to do'",
        PREPARE,
        "    if not overwrite and source != str(src_r):",
        "    if False:",
        ["tests/data/test_streaming_converter_inputs.py"],
    ),
    breakage(
        "shards-published-0700",
        "a staged output folder (shards, synthetic sets) keeps mkdtemp's 0700 instead of the user's umask",
        "aa_lightning/atomic_files.py",
        "        give_umask_modes(staged)\n",
        "        pass\n",
        ["tests/data/test_streaming_converter_inputs.py"],
    ),
    breakage(
        "converter-workers-outlive-a-kill",
        "litdata's conversion workers keep running after the converter is killed",
        PREPARE,
        "    if not _STOP_WITH_PARENT:\n        return",
        "    if True:\n        return",
        ["tests/data/test_streaming_converter_inputs.py"],
    ),
    breakage(
        "object-store-error-not-explained",
        "missing object-store credentials reach the user as the store client's own multi-line error",
        "aa_lightning/data/streaming.py",
        "                    raise object_store_error(remote, err) from err",
        "                    raise",
        ["tests/data/test_streaming_converter_inputs.py"],
    ),
    breakage(
        "checkpoint-not-atomic",
        "checkpoints written by Lightning's own writer (a kill mid-save can leave a partial last.ckpt)",
        FAULTS,
        "        atomic_torch_save(checkpoint, path)",
        "        super().save_checkpoint(checkpoint, path, storage_options)",
        ["tests/training/test_faults.py"],
    ),
    breakage(
        "resume-random-state-not-restored",
        "a resumed run does not restore torch / numpy / Python random states (dropout draws differ)",
        FAULTS,
        "        if self._pending is None:\n            return",
        "        if True:\n            return",
        ["tests/training/test_resume.py"],
    ),
    breakage(
        "resume-loader-position-lost",
        "a resumed run restarts the training loader at the epoch's start (replays its first batches)",
        FAULTS,
        "        restore_training_loader_state(trainer)  # Lightning #20550",
        "        pass  # Lightning #20550",
        ["tests/training/test_resume.py"],
    ),
    breakage(
        "sigterm-exits-zero",
        "SIGTERM stops the run with exit status 0 (a scheduler sees a finished job)",
        FAULTS,
        "        self.exit_code = 128 + int(signum)",
        "        self.exit_code = 0",
        ["tests/training/test_resume.py"],
    ),
    breakage(
        "kwargs-override-replaces-recipe",
        "a later model_kwargs / backbone_kwargs (override file, flag) replaces the recipe's dict instead of merging",
        "aa_lightning/training/cli.py",
        "            merged[kwargs_key] = {**before, **given}",
        "            merged[kwargs_key] = given",
        ["tests/training/test_cli_config_roundtrip.py", "tests/training/test_faults.py"],
    ),
    breakage(
        "kwargs-kept-for-another-model",
        "a source naming another model_name / backbone still merges into the previous model's kwargs",
        "aa_lightning/training/cli.py",
        "        if name is not None and previous_name is not None and name != previous_name:",
        "        if False:",
        ["tests/training/test_cli_config_roundtrip.py", "tests/training/test_cli_recipes.py"],
    ),
    breakage(
        "augment-skips-a-stage",
        "augment leaves the last chosen stage plain (aa_resnet50: no AA layer in layer4)",
        AUGMENT,
        "    for number in chosen:\n",
        "    for number in chosen[:-1]:\n",
        MODEL_TESTS,
    ),
    breakage(
        "augment-sizes-tables-for-the-output",
        "augment sizes a strided conv's relative tables for its output grid, not its input",
        AUGMENT,
        "        layer = attention.augment(conv, sizes[name])",
        "        layer = attention.augment(conv, tuple(-(-n // conv.stride[0]) for n in sizes[name]))",
        MODEL_TESTS,
    ),
    breakage(
        "augment-min-reduction-ignored",
        "augment's min_reduction ignored (aa_mnasnet_*: every inverted residual augmented)",
        AUGMENT,
        "if PROBE_SIZE // probe[name][0] >= min_reduction}",
        "if PROBE_SIZE // probe[name][0] >= 1}",
        MODEL_TESTS,
    ),
    breakage(
        "augment-cache-ignores-img-size",
        "the traced conv sizes reused for another img_size (tables sized for the first one built)",
        AUGMENT,
        "key = (type(model), repr(model), tuple(img_size), tuple(convs)) if cache else None",
        "key = (type(model), repr(model), tuple(convs)) if cache else None",
        MODEL_TESTS,
    ),
    breakage(
        "augment-init-skipped",
        "the new AA layers keep torch's default init, not the model family's (Kaiming fan-out / zero biases)",
        AUGMENT,
        "        init(layer)\n",
        "",
        ("tests/models/test_models_augment.py",),
    ),
    breakage(
        "grouped-dv-splits-groups",
        "a grouped conv's dv rounded to Nh only (ResNeXt: the conv branch no longer splits into its groups)",
        SETTINGS,
        "            unit = math.lcm(self.heads, groups)",
        "            unit = self.heads",
        ("tests/models/test_models_augment.py",),
    ),
    breakage(
        "bool-taken-as-integer",
        "aa_heads: true builds 1 head (aa_stages: [true] stage 1, img_size: true a 1x1 table)",
        SETTINGS,
        "    return isinstance(value, int) and not isinstance(value, bool)",
        "    return isinstance(value, int)",
        MODEL_TESTS,
    ),
    breakage(
        "bool-taken-as-number",
        "aa_v: true builds fully attentional layers (aa_k: true, aa_rel_init_std: true accepted)",
        SETTINGS,
        "    return isinstance(value, (int, float)) and not isinstance(value, bool)",
        "    return isinstance(value, (int, float))",
        ("tests/models/test_models_settings.py",),
    ),
    # the test harness itself: the CLI tests run train.py in-process and read its warnings from the run's stderr
    breakage(
        "in-process-cli-loses-warnings",
        "run_cli in-process: the run's warnings go to pytest's record, not its stderr (warning checks pass vacuously)",
        "tests/helpers/cli_helpers.py",
        "            warnings.showwarning = show\n",
        "",
        ["tests/training/test_cli_in_process.py"],
    ),
    breakage(
        "in-process-cli-runs-ddp",
        "run_cli starts a DDP recipe in the test process (Lightning relaunches pytest's command line)",
        "tests/helpers/cli_helpers.py",
        "        return True\n\n    def more_than_one",
        "        return False\n\n    def more_than_one",
        ["tests/training/test_cli_in_process.py"],
    ),
    breakage(
        "version-claim-not-exclusive",
        "a new run takes the next version_N without creating it exclusively (runs started together share one folder)",
        CLI,
        '            os.mkdir(root / f"version_{version}")\n            return version',
        "            return version",
        ["tests/training/test_concurrent_runs.py"],
    ),
    breakage(
        "resume-settings-not-checked",
        "a resume with another batch size / base_lr / max_epochs / world size / num_workers is not refused",
        CLI,
        "            check_resume_settings(checkpoint, Path(cfg.ckpt_path), self.resume_settings.settings)\n",
        "",
        ["tests/training/test_resume_changes.py"],
    ),
    breakage(
        "resume-writes-before-it-succeeded",
        "a resumed run's logger and config.yaml write at setup, before the resume has succeeded",
        CLI,
        "                save_dir=self.config.runs_dir, name=self.config.run_name, version=version, hold=resuming",
        "                save_dir=self.config.runs_dir, name=self.config.run_name, version=version, hold=False",
        ["tests/training/test_resume_changes.py"],
        more=[Edit(CLI, "                callback.defer = resuming", "                callback.defer = False")],
    ),
    breakage(
        "killed-save-leftovers-kept",
        "the temporary files of killed checkpoint saves are never removed",
        CLI,
        "            if _KILLED_SAVE.match(path.name) and path.is_file() and not path.is_symlink():",
        "            if False:",
        ["tests/training/test_resume_changes.py"],
    ),
    breakage(
        "killed-save-cleanup-too-broad",
        "the cleanup of killed saves removes any *.tmp file beside the checkpoints, the user's too",
        CLI,
        "            if _KILLED_SAVE.match(path.name) and path.is_file() and not path.is_symlink():",
        '            if path.name.endswith(".tmp") and path.is_file():',
        ["tests/training/test_resume_changes.py"],
    ),
    breakage(
        "checkpoint-checksum-not-checked",
        "a resume and read_checkpoint load a checkpoint whose bytes fail its zip CRC-32 (a flipped bit resumes)",
        "aa_lightning/models/weights.py",
        "            return archive.testzip()",
        "            return None",
        ["tests/training/test_checkpoint_integrity.py"],
    ),
    breakage(
        "non-finite-checkpoint-accepted",
        "a checkpoint with NaN / inf weights or optimizer state is resumed and read for predict",
        "aa_lightning/models/weights.py",
        "                if bad:\n                    found.append(",
        "                if False:\n                    found.append(",
        ["tests/training/test_checkpoint_integrity.py"],
    ),
    breakage(
        "signal-outside-training-ignored",
        "SIGTERM / SIGINT outside the training steps (sanity check, start-up, test) are left to Lightning / Python "
        "(exit 0 or 1)",
        FAULTS,
        "                self._previous[signum] = signal.signal(signum, self._handler)\n        return self",
        "                pass\n        return self",
        ["tests/training/test_signals_anywhere.py"],
    ),
    breakage(
        "project-value-error-traceback",
        "a ValueError of the project's classes while building the model / data prints the 60-line double traceback",
        CLI,
        '                if isinstance(err, CheckpointError) or own is None or os.environ.get(DEBUG_ENV, "") not in',
        '                if True or os.environ.get(DEBUG_ENV, "") not in',
        ["tests/training/test_cli_errors.py"],
    ),
    breakage(
        "duplicate-yaml-key-accepted",
        "a recipe YAML that names one key twice silently keeps the last value",
        CLI,
        "            if duplicate is not None:\n                key, line = duplicate",
        "            if False:\n                key, line = duplicate",
        ["tests/training/test_cli_errors.py"],
    ),
    # issue 22, item 14: what a recipe promises, each switched off once
    breakage(
        "training-samples-never-shuffled",
        "the training sampler keeps the file order (every epoch the same class-sorted batches)",
        "aa_lightning/data/loaders.py",
        "rank=rank, shuffle=True, seed=seed, drop_last=False)",
        "rank=rank, shuffle=False, seed=seed, drop_last=False)",
        ["tests/data/test_sampling_order.py"],
    ),
    breakage(
        "torch-files-unpickle-code",
        "checkpoints handed in (--ckpt_path, predict, export, backbone weights) are loaded with weights_only=False",
        "aa_lightning/models/weights.py",
        'contents = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)',
        'contents = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)',
        ["tests/training/test_untrusted_files.py"],
    ),
    breakage(
        "global-batch-ignores-processes",
        "the learning rate is scaled by the batch of one process, not of all devices and nodes",
        "aa_lightning/tasks/optim.py",
        "    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches",
        "    return int(per_device) * trainer.accumulate_grad_batches",
        ["tests/tasks/test_lr_rule.py"],
    ),
    breakage(
        "global-batch-ignores-accumulation",
        "the learning rate ignores gradient accumulation in the global batch",
        "aa_lightning/tasks/optim.py",
        "    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches",
        "    return int(per_device) * trainer.world_size",
        ["tests/tasks/test_lr_rule.py"],
    ),
    breakage(
        "triton-refusal-fallback-not-taken",
        "a Triton launch the GPU refuses (OutOfResources) is raised instead of falling back to chunked",
        "aa_lightning/kernels/triton/fallback.py",
        "    if isinstance(error, triton.OutOfResources):\n        return True",
        "    if isinstance(error, triton.OutOfResources):\n        return False",
        ["tests/kernels/test_triton_kernels.py"],
    ),
    breakage(
        "triton-refusal-fallback-silent",
        "a refused Triton launch falls back to chunked without the warning naming the shape and the GPU",
        "aa_lightning/kernels/triton/fallback.py",
        "    _REFUSED.add(key)\n    _, h, w, dkh = q.shape\n    warnings.warn(",
        "    _REFUSED.add(key)\n    _, h, w, dkh = q.shape\n    (lambda *args, **kwargs: None)(",
        ["tests/kernels/test_triton_kernels.py"],
    ),
    breakage(
        "mixing-applied-at-eval",
        "validation and test images are mixed too (timm's Mixup in the evaluation step)",
        CLASSIFICATION,
        "    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> None:\n"
        "        images, targets = batch\n",
        "    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metrics: MetricCollection) -> None:\n"
        "        images, targets = batch\n"
        "        images = self.mix(images, targets, 0)[0]\n",
        ["tests/tasks/test_mixing.py"],
    ),
    breakage(
        "ema-not-used-at-validation",
        "validation reports the raw weights although the EMA callback is on (no swap around validation)",
        "aa_lightning/callbacks/model_ema.py",
        "    def on_load_checkpoint(",
        "    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:\n"
        "        pass\n\n"
        "    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:\n"
        "        pass\n\n"
        "    def on_load_checkpoint(",
        ["tests/callbacks/test_model_ema.py"],
    ),
    breakage(
        "mixing-seed-not-restored-on-resume",
        "the mixing draws are seeded by a call counter of the mixer (not saved), not by the optimizer step: a resumed "
        "run mixes differently",
        "aa_lightning/tasks/mixing.py",
        "        np.random.seed(step_seed(self.seed, step, micro_batch))",
        "        self.calls = getattr(self, 'calls', 0) + 1\n"
        "        np.random.seed(step_seed(self.seed, self.calls, micro_batch))",
        ["tests/tasks/test_mixing.py"],
    ),
]


# -- the copy -------------------------------------------------------------------------------------------
def repository_files(repo: Path) -> list[str]:
    """Tracked files plus untracked ones git does not ignore (relative paths)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    return sorted({name for name in out.decode().split("\0") if name and (repo / name).is_file()})


def copy_repository(repo: Path, dest: Path) -> None:
    for name in repository_files(repo):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)


def check_entry(repo: Path, entry: Breakage) -> list[str]:
    """What is wrong with ``entry`` against the files of ``repo`` (empty: it applies)."""
    problems = []
    for edit in entry.edits:
        path = repo / edit.file
        if not path.is_file():
            problems.append(f"{entry.name}: {edit.file} does not exist")
            continue
        count = path.read_text().count(edit.old)
        if count != 1:
            problems.append(
                f"{entry.name}: the old text occurs {count} times in {edit.file} (must be exactly once): {edit.old!r}"
            )
    return problems


def apply(root: Path, entry: Breakage) -> dict[Path, str]:
    """Apply ``entry``'s edits in the copy ``root``; returns the edited files' original texts (for :func:`restore`)."""
    originals: dict[Path, str] = {}
    for edit in entry.edits:
        path = root / edit.file
        text = path.read_text()
        originals.setdefault(path, text)
        path.write_text(text.replace(edit.old, edit.new, 1))
    return originals


def restore(originals: dict[Path, str]) -> None:
    """Put back the copy's files as :func:`apply` found them (the repository may change meanwhile)."""
    for path, text in originals.items():
        path.write_text(text)


# -- running the tests ----------------------------------------------------------------------------------
_FAILURE = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def run_tests(root: Path, tests: Sequence[str], timeout: float, pytest_args: Sequence[str]) -> tuple[str, str, float]:
    """(``passed`` | ``failed`` | ``timeout``, the first failing test or a note, seconds)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *pytest_args, *tests]
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode == 0:
        return "passed", "", seconds
    match = _FAILURE.search(output)
    if match:
        return "failed", match.group(2), seconds
    return "failed", f"pytest exit status {result.returncode}: {output.strip().splitlines()[-1:] or ''}", seconds


def markdown_table(rows: list[tuple[str, str, str, str, str]]) -> str:
    lines = ["| breakage | what it breaks | file(s) | result | first failing test |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tests",
        nargs="+",
        default=None,
        help="test files / node ids to run for every breakage (default: the default suite, tests/)",
    )
    parser.add_argument("--quick", action="store_true", help="run each breakage's own test files only")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="apply only these breakages")
    parser.add_argument("--list", action="store_true", help="list the breakages and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per test run (default 1800)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the tests on the unbroken copy first")
    parser.add_argument("--repo", type=Path, default=REPO, help="repository to copy (default: this one)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string (e.g. '-k \"not ddp\"')")
    args = parser.parse_args(argv)
    if args.tests and args.quick:
        parser.error("--tests and --quick choose the tests differently; give one of them")

    entries = BREAKAGES
    if args.only:
        unknown = sorted(set(args.only) - {e.name for e in BREAKAGES})
        if unknown:
            parser.error(f"--only: unknown breakage(s) {unknown}; known: {[e.name for e in BREAKAGES]}")
        entries = [e for e in BREAKAGES if e.name in args.only]
    if args.list:
        for e in entries:
            status = f"TODO: {e.todo}" if e.todo else ", ".join(sorted({edit.file for edit in e.edits}))
            print(f"{e.name:36s} {e.description}  [{status}]")
        return 0

    repo = args.repo.resolve()
    problems = [p for e in entries if not e.todo for p in check_entry(repo, e)]
    if problems:
        print("mutation_check: these breakages no longer apply (update them to the current code):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2

    import shlex

    pytest_args = shlex.split(args.pytest_args)

    def tests_of(entry: Breakage | None) -> list[str]:
        if args.tests:
            return list(args.tests)
        if entry is not None and entry.pytest_args:
            return list(entry.tests)
        if args.quick:
            if entry is None:  # the baseline: the union of what the entries run
                return sorted({t for e in entries if not e.todo and not e.pytest_args for t in e.tests})
            return list(entry.tests)
        return ["tests"]

    rows = []
    survived = 0
    with tempfile.TemporaryDirectory(prefix="aa_mutation_") as tmp:
        root = Path(tmp) / "repo"
        copy_repository(repo, root)
        if not args.skip_baseline:
            status, detail, seconds = run_tests(root, tests_of(None), args.timeout, pytest_args)
            print(f"baseline (unbroken copy): {status} in {seconds:.0f} s {detail}", file=sys.stderr, flush=True)
            if status != "passed":
                print("mutation_check: the tests fail without any breakage; fix that first", file=sys.stderr)
                return 2
        for entry in entries:
            files = ", ".join(sorted({f"`{edit.file}`" for edit in entry.edits})) or "-"
            if entry.todo:
                rows.append((f"`{entry.name}`", entry.description, files, "TODO", entry.todo))
                continue
            originals = apply(root, entry)
            try:
                extra = [*pytest_args, *(entry.pytest_args if not args.tests else ())]
                status, detail, seconds = run_tests(root, tests_of(entry), args.timeout, extra)
            finally:
                restore(originals)
            caught = status == "failed"
            survived += not caught
            result = "caught" if caught else ("SURVIVED" if status == "passed" else f"SURVIVED ({status})")
            first = f"`{detail}`" if caught else detail
            rows.append((f"`{entry.name}`", entry.description, files, result, first))
            print(f"{entry.name}: {result} in {seconds:.0f} s {detail}", file=sys.stderr, flush=True)
    print(markdown_table(rows))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
