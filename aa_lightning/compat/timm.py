"""The one place the models use timm's private API, checked against the timm versions it was tested with.

One use: MnasNet-A1 at a channel multiplier timm registers no model for (1.25, the paper's
AA-MnasNet-A1 1.25 and its baseline ``semnasnet_125``). timm's public entry points exist only at
0.5 / 0.75 / 1.0 / 1.4 (``semnasnet_050`` ... ``semnasnet_140``, used here for those multipliers);
the generator that takes the multiplier, ``timm.models.efficientnet._gen_mnasnet_a1``, is private,
and building timm's public ``EfficientNet`` class directly needs the block decoder and channel
rounding of timm's private ``_efficientnet_builder``. No upstream issue asks for a public
multiplier argument (none found, Dec 2026); if timm adds one, use it and delete this module.

Tested with timm 1.0.31; accepted: ``TESTED_TIMM`` (pyproject's lower bound up to the next minor
release). Outside it the private use fails with a one-line error naming the version, instead of
building a network that may differ.
"""

from __future__ import annotations

import re
from typing import Any

import timm
from timm.models import PretrainedCfg, model_entrypoint
from timm.models.efficientnet import EfficientNet

#: [lowest, first untested) timm versions for the private use below
TESTED_TIMM = ((1, 0, 9), (1, 1, 0))


def check_timm_version(version: str | None = None) -> None:
    """A RuntimeError (one line, naming ``version``, default timm's) outside :data:`TESTED_TIMM`."""
    version = timm.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    low, high = TESTED_TIMM
    if match is None or not low <= tuple(int(n) for n in match.groups()) < high:
        raise RuntimeError(
            f"aa_lightning.compat.timm: timm {version} is outside the tested range "
            f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))} (timm's private MnasNet-A1 generator "
            "builds aa_mnasnet_125 / semnasnet_125); install a timm in that range"
        )


def mnasnet_a1(channel_multiplier: float, pretrained_cfg: PretrainedCfg, **kwargs: Any) -> EfficientNet:
    """timm's MnasNet-A1 (with SE) at ``channel_multiplier`` with ``pretrained_cfg`` (e.g. that of an AA
    variant, resolved by the caller); kwargs go to timm (``pretrained=False`` unless given)."""
    registered = {0.5: "semnasnet_050", 0.75: "semnasnet_075", 1.0: "semnasnet_100", 1.4: "semnasnet_140"}
    if channel_multiplier in registered:
        return model_entrypoint(registered[channel_multiplier])(pretrained_cfg=pretrained_cfg, **kwargs)
    check_timm_version()
    from timm.models import efficientnet  # the private generator, see the module doc

    pretrained = kwargs.pop("pretrained", False)
    return efficientnet._gen_mnasnet_a1(
        pretrained_cfg.architecture, channel_multiplier, pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs
    )
