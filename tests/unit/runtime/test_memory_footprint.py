"""What each process imports and how it allocates: issue #13's memory target (the summed peak
RSS of 1 producer and 2 consumers <= 250 MiB) depends on the producer not loading the
consumer's libraries, on the consumer loading its rare-path ones only when a value needs them,
and on the entry point keeping glibc's malloc to one arena.

Each check runs in a fresh interpreter, since this test session imports everything.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

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


# Counts glibc's malloc arenas (``malloc_info``'s <heap> elements) after a thread allocated.
ARENA_PROBE = """
import ctypes, os, sys, tempfile, threading
import service.cli
capped = service.cli.limit_malloc_arenas()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.malloc.restype = ctypes.c_void_p
def work():
    for p in [libc.malloc(4096) for _ in range(100)]:
        libc.free(ctypes.c_void_p(p))
t = threading.Thread(target=work)
t.start()
t.join()
fd, path = tempfile.mkstemp()
os.close(fd)
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
print(capped, open(path).read().count("<heap nr="))
os.unlink(path)
"""


def _arenas(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ARENA_PROBE], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True, timeout=60)
    capped, arenas = out.stdout.split()
    return capped, int(arenas)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc arenas")
def test_the_entry_point_keeps_threads_in_one_malloc_arena() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _arenas(env) == ("True", 1)
    # an operator's MALLOC_ARENA_MAX rules (glibc read it at start): a thread gets its own
    assert _arenas({**env, "MALLOC_ARENA_MAX": "4"}) == ("False", 2)
