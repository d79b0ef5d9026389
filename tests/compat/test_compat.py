"""aa_lightning.compat: a private API of another library is used only inside the version range it was
tested with; outside it, one line naming the library and the version, before anything is computed."""

import pytest

from aa_lightning.compat import versions


@pytest.fixture(autouse=True)
def fresh_cache():
    versions.require_tested.cache_clear()
    yield
    versions.require_tested.cache_clear()


@pytest.mark.parametrize(
    ("installed", "ok"),
    [("1.4.0", True), ("1.9.0", True), ("1.9.0+cu130", True), ("1.10.2rc1", True), ("2.0.0", False), ("1.3.9", False)],
)
def test_the_tested_range_is_checked(monkeypatch, installed, ok):
    monkeypatch.setattr(versions, "version", lambda package: installed)
    if ok:
        assert versions.require_tested("torchmetrics", "1.4", "2.0", "the gather") == installed
    else:
        with pytest.raises(versions.UntestedVersionError, match=rf"torchmetrics {installed} is installed") as err:
            versions.require_tested("torchmetrics", "1.4", "2.0", "the gather")
        assert "the gather" in str(err.value) and "'torchmetrics>=1.4,<2.0'" in str(err.value)


def test_a_missing_library_is_named(monkeypatch):
    def missing(package):
        raise versions.PackageNotFoundError(package)

    monkeypatch.setattr(versions, "version", missing)
    with pytest.raises(versions.UntestedVersionError, match="needs triton >= 3.0, < 3.9; it is not installed"):
        versions.require_tested("triton", "3.0", "3.9", "the patch")


def test_the_detection_metric_refuses_an_untested_torchmetrics(monkeypatch):
    from aa_lightning.tasks.detection_metrics import DistributedMeanAveragePrecision

    monkeypatch.setattr(versions, "version", lambda package: "2.1.0")
    with pytest.raises(versions.UntestedVersionError, match="torchmetrics 2.1.0"):
        DistributedMeanAveragePrecision(iou_type="bbox")
