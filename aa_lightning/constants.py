"""Data set constants shared by the models' pretrained configs and the data pipelines (as timm.data.constants)."""

#: CIFAR-100 training-set per-channel mean / std of [0, 1] RGB.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
