"""timm's stochastic depth / dropout kwargs reach the AA models: drop_path_rate > 0 is accepted by aa_resnet50 and
aa_mnasnet_100, puts DropPath modules in the residual branches and changes training-mode outputs only."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropPath

import aa_lightning  # noqa: F401  (registers the AA models)


@pytest.mark.parametrize("name", ["aa_resnet50", "aa_mnasnet_100"])
def test_drop_path_rate_reaches_the_aa_model_and_changes_training_outputs_only(name):
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=10, drop_path_rate=0.0)
    dropped = timm.create_model(name, num_classes=10, drop_path_rate=0.3, drop_rate=0.2)
    rates = [m.drop_prob for m in dropped.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.3, abs=0.05) and min(rates) >= 0.0
    assert not any(isinstance(m, DropPath) and m.drop_prob > 0 for m in plain.modules())
    dropped.load_state_dict(plain.state_dict())  # the same weights: only the stochastic layers differ
    x = torch.randn(4, 3, 64, 64)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), dropped(x))  # evaluation: no stochastic depth, no dropout
        plain.train(), dropped.train()
        torch.manual_seed(1)
        reference = plain(x)
        torch.manual_seed(1)
        assert not torch.allclose(reference, dropped(x))
