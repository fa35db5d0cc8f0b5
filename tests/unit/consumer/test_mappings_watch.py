"""MappingsWatcher: a changed file is validated, then applied or refused (old one kept)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from service.consumer.mappings_watch import MappingsWatcher, mappings_version
from service.erp.mappings import DEFAULT_PATH, Mappings
from service.errors import ConfigError
from service.metrics import ConsumerMetrics

SHIPPED = DEFAULT_PATH.read_text("utf-8")
NEW_WORD = SHIPPED.replace("[order_status]\n", '[order_status]\n"已出库" = "SHIPPED"\n', 1)
BROKEN = SHIPPED.replace("[order_status]\n", '[order_status]\n"已出库" = "shipped"\n', 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def write(path: Path, text: str | bytes, bump_ns: int = 0) -> None:
    if isinstance(text, str):
        path.write_text(text, "utf-8")
    else:
        path.write_bytes(text)
    if bump_ns:  # a distinct mtime even on file systems with a coarse clock
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + bump_ns))


def check(clock: Clock, watcher: MappingsWatcher) -> Mappings | None:
    """The checks that read a change: the first sees the file changed (not read yet: it may
    be half-written), the next finds it as it was and reads it."""
    clock.now += 5
    assert watcher.poll() is None
    clock.now += 5
    return watcher.poll()


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Clock, ConsumerMetrics, MappingsWatcher]:
    path = tmp_path / "mappings.toml"
    write(path, SHIPPED)
    clock, metrics = Clock(), ConsumerMetrics()
    return path, clock, metrics, MappingsWatcher(path, check_interval_s=5, metrics=metrics,
                                                 clock=clock)


def test_version_is_a_short_hash_of_the_bytes() -> None:
    assert mappings_version(b"x") == mappings_version(b"x")
    assert mappings_version(b"x") != mappings_version(b"y")
    assert len(mappings_version(b"")) == 12


def test_a_valid_change_is_applied_after_the_check_interval(env: tuple[
        Path, Clock, ConsumerMetrics, MappingsWatcher]) -> None:
    path, clock, metrics, watcher = env
    old = watcher.version
    assert sample(metrics.registry, "crm_erp_sync_mappings_info", version=old) == 1
    assert Mappings.lookup(watcher.mappings.order_status, "已出库") is None
    write(path, NEW_WORD, bump_ns=1_000_000)
    assert watcher.poll() is None  # not due yet
    fresh = check(clock, watcher)
    assert fresh is not None and fresh is watcher.mappings
    assert Mappings.lookup(fresh.order_status, "已出库") == "SHIPPED"
    assert watcher.version == mappings_version(NEW_WORD.encode()) != old
    assert sample(metrics.registry, "crm_erp_sync_mappings_info", version=old) is None
    assert sample(metrics.registry, "crm_erp_sync_mappings_info", version=watcher.version) == 1
    assert sample(metrics.registry, "crm_erp_sync_mappings_reloads_total",
                  outcome="applied") == 1
    clock.now += 5
    assert watcher.poll() is None  # unchanged since


def test_a_broken_file_is_refused_once_and_the_old_one_kept(env: tuple[
        Path, Clock, ConsumerMetrics, MappingsWatcher]) -> None:
    path, clock, metrics, watcher = env
    kept, version = watcher.mappings, watcher.version
    write(path, BROKEN, bump_ns=1_000_000)
    assert check(clock, watcher) is None
    assert watcher.mappings is kept and watcher.version == version
    assert watcher.refusal is not None
    assert watcher.refusal.version == mappings_version(BROKEN.encode())
    assert f'{path}: order_status."已出库"' in watcher.refusal.error
    assert "ERP status code" in watcher.refusal.error
    assert sample(metrics.registry, "crm_erp_sync_mappings_reload_failing") == 1
    assert sample(metrics.registry, "crm_erp_sync_mappings_reloads_total",
                  outcome="refused") == 1
    # The same bad content, touched again: not counted (nor logged) a second time.
    write(path, BROKEN, bump_ns=2_000_000)
    assert check(clock, watcher) is None
    assert sample(metrics.registry, "crm_erp_sync_mappings_reloads_total",
                  outcome="refused") == 1
    # Fixed: applied, and the alarm clears.
    write(path, NEW_WORD, bump_ns=3_000_000)
    assert check(clock, watcher) is not None
    assert watcher.refusal is None
    assert sample(metrics.registry, "crm_erp_sync_mappings_reload_failing") == 0


def test_put_back_as_it_was_clears_the_refusal_without_a_reload(env: tuple[
        Path, Clock, ConsumerMetrics, MappingsWatcher]) -> None:
    path, clock, metrics, watcher = env
    write(path, b"\xff\xfe not utf-8", bump_ns=1_000_000)
    assert check(clock, watcher) is None
    assert watcher.refusal is not None and "not UTF-8" in watcher.refusal.error
    write(path, SHIPPED, bump_ns=2_000_000)
    assert check(clock, watcher) is None
    assert watcher.refusal is None
    assert sample(metrics.registry, "crm_erp_sync_mappings_reload_failing") == 0
    assert sample(metrics.registry, "crm_erp_sync_mappings_reloads_total",
                  outcome="applied") is None


def test_a_missing_file_is_refused(env: tuple[
        Path, Clock, ConsumerMetrics, MappingsWatcher]) -> None:
    path, clock, _, watcher = env
    path.unlink()
    assert check(clock, watcher) is None
    assert watcher.refusal is not None and watcher.refusal.version is None
    assert "cannot read" in watcher.refusal.error


def test_sighup_checks_at_once_before_the_interval(env: tuple[
        Path, Clock, ConsumerMetrics, MappingsWatcher]) -> None:
    path, _, _, watcher = env
    write(path, NEW_WORD, bump_ns=1_000_000)
    assert watcher.poll() is None  # the periodic check is not due yet
    watcher.request_reload()
    fresh = watcher.poll()
    assert fresh is not None and Mappings.lookup(fresh.order_status, "已出库") == "SHIPPED"


def test_a_file_still_changing_is_not_read_until_it_stays_the_same_for_a_check(env: tuple[
        Path, Clock, ConsumerMetrics, MappingsWatcher]) -> None:
    """Written in place and caught half-way: a half that parses (the products table cut
    short) must not be applied, even for a moment."""
    path, clock, metrics, watcher = env
    half = NEW_WORD[:NEW_WORD.index("[products]")] + "[products]\n"
    write(path, half, bump_ns=1_000_000)
    clock.now += 5
    assert watcher.poll() is None  # seen changed
    write(path, NEW_WORD, bump_ns=2_000_000)  # the rest written before the next check
    clock.now += 5
    assert watcher.poll() is None  # changed again since: still not read
    clock.now += 5
    fresh = watcher.poll()
    assert fresh is not None and watcher.version == mappings_version(NEW_WORD.encode())
    assert sample(metrics.registry, "crm_erp_sync_mappings_reloads_total",
                  outcome="applied") == 1  # the half was never applied
    assert sample(metrics.registry, "crm_erp_sync_mappings_reloads_total",
                  outcome="refused") is None


def test_a_consumer_does_not_start_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    write(path, BROKEN)
    with pytest.raises(ConfigError, match="order_status"):
        MappingsWatcher(path)


def test_parse_names_the_source_for_bytes_that_are_not_toml() -> None:
    with pytest.raises(ConfigError, match=r"^x\.toml: not valid TOML"):
        Mappings.parse(b"[order_status\n", "x.toml")


def test_the_unit_registry_is_not_held_once_the_file_is_read(tmp_path: Path) -> None:
    from service.erp import units

    path = tmp_path / "mappings.toml"
    write(path, SHIPPED)
    watcher = MappingsWatcher(path, check_interval_s=0)
    assert units._registry.cache_info().currsize == 0
    assert watcher.mappings.sku_units == Mappings.parse(SHIPPED.encode(), "x").sku_units
