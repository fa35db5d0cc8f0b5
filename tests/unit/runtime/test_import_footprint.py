"""What each process imports: issue #13's memory target (the summed peak RSS of 1 producer and
2 consumers <= 250 MiB) depends on the producer not loading the consumer's libraries and on
the consumer loading its rare-path ones only when a value needs them.

Each check runs in a fresh interpreter, since this test session imports everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

# Only the consumer's transform (service.erp) uses these; each costs MiB of resident memory.
CONSUMER_ONLY = ("phonenumbers", "opencc", "cn2an", "proces", "nameparser", "pint",
                 "service.erp.transform", "service.erp.divisions", "service.consumer.pipeline",
                 "service.demo")
# Imported by the transform only for a Chinese-numeral quantity or a one-field non-CJK name.
RARE_PATH = ("cn2an", "proces", "nameparser")


def _modules_after(code: str) -> set[str]:
    """sys.modules after running `code` in a fresh interpreter at the repository root."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(m == n or m.startswith(n + ".") for m in modules))


def test_the_producer_does_not_import_the_consumers_libraries() -> None:
    modules = _modules_after("import service.cli, service.cdc.producer")
    assert "service.cdc.producer" in modules
    assert _loaded(modules, CONSUMER_ONLY) == []


def test_the_demo_workload_transforms_without_the_rare_path_libraries() -> None:
    """The demo's customers (eastern and western names), orders and lines mapped to ERP
    changes: cn2an and nameparser stay unloaded (they load when a value needs them)."""
    code = """
from datetime import UTC, datetime
from service.cdc.events import CREATE, References, RowChange, build_events
from service.cdc.profile import load_profile
from service.demo.generator import DemoGenerator
from service.erp.changes import to_erp
from service.erp.mappings import Mappings

profile, mappings, gen = load_profile("demo"), Mappings.load(), DemoGenerator(13)
customers = [gen.customer(cid) for cid in range(1, 301)]
orders = list(gen.orders(list(range(1, 301)), [c.customer_id for c in customers]))
changes = [RowChange("crm.customers", CREATE, None, c._asdict()) for c in customers]
for o in orders:
    changes.append(RowChange("crm.sales_orders", CREATE, None, o.header._asdict()))
    changes += [RowChange("crm.order_lines", CREATE, None, ln._asdict()) for ln in o.lines]
events = build_events(changes, profile=profile, refs=References(), lsn=1, xid=1,
                      commit_time=datetime.now(UTC))
kinds = {e.kind for e in events if to_erp(e.kind, e.record, mappings) is not None}
assert kinds == {"customer", "order"}, kinds
"""
    modules = _modules_after(code)
    assert "service.erp.transform" in modules and "phonenumbers" in modules
    assert _loaded(modules, RARE_PATH) == []


def test_the_rare_paths_still_work() -> None:
    from service.erp import transform as tf
    from service.erp.mappings import Mappings

    mappings = Mappings.load()
    assert tf.parse_quantity("十台", mappings).value == 10
    assert tf.full_name("Smith, John", None, None, "western") == "John Smith"
