"""``crm_erp_sync_apply_window_open`` without an apply window: 1 ("changes may be applied",
its HELP text), not the gauge's initial 0, which reads as "outside the window" and defeats
the README's alert ``min(crm_erp_sync_apply_window_open) == 1 and lag > 10000``."""

from __future__ import annotations

from types import SimpleNamespace

from service.consumer.pipeline import ErpConsumer
from service.metrics import ConsumerMetrics


def test_no_window_set_reports_the_window_open() -> None:
    metrics = ConsumerMetrics()
    assert metrics.apply_window_open._value.get() == 0  # before the first poll
    stub = SimpleNamespace(window=None, metrics=metrics)
    ErpConsumer._apply_window(stub)  # type: ignore[arg-type]
    assert metrics.apply_window_open._value.get() == 1
