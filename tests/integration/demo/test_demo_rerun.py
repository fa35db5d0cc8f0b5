"""`make demo` again on a stack where it ran before: its slot lost to other work's WAL (a
shared dev stack's max_slot_wal_keep_size) or dropped by hand. The demo owns its databases:
it starts over with a new slot and a full snapshot by itself, and the re-snapshot of its
messy rows leaves one open letter per row.

The lost-slot test loses its slot on a private cluster (``small_wal_env``, tests/conftest.py):
shrinking max_slot_wal_keep_size is cluster-wide, and on a shared server it would cost everyone
else there their idle slots."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.demo.run import print_erp_summary, run_demo
from tests.conftest import SyncEnv
from tests.integration.cdc.test_slot_lost import lose_the_slot


def _demo(sync_env: SyncEnv, logs: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = run_demo(sync_env.settings, customers=15, orders=20, logs=logs)
    out = capsys.readouterr()
    assert code == 0, out.out + out.err + "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.glob("*.log"))
    return out.out


def _open_letters(sync_env: SyncEnv) -> list[tuple[str, str, str]]:
    with sync_env.erp() as erp:
        return sorted(erp.execute(
            "SELECT convert_from(msg_key, 'UTF8'), event_kind, split_part(error_message, ':', 1)"
            " FROM sync.dead_letters WHERE state IN ('open', 'failed_again')").fetchall())


def test_a_demo_run_again_after_its_slot_was_lost_recovers_by_itself(
        small_wal_env: SyncEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sync_env = small_wal_env
    _demo(sync_env, tmp_path / "first", capsys)
    first = _open_letters(sync_env)
    assert ("customer", "phone") in {(k, f) for _, k, f in first}, first
    lose_the_slot(sync_env)

    out = _demo(sync_env, tmp_path / "second", capsys)
    assert "slot" in out and "lost" in out, out  # says what happened and what it did
    with sync_env.crm() as crm:
        assert crm.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
                           (sync_env.settings.slot_name,)).fetchone()[0] != "lost"
    # the first run's masked customer was read again by the new snapshot: still one open
    # letter for it (and one for the second run's)
    customers = [k for k, kind, _ in _open_letters(sync_env) if kind == "customer"]
    assert len(customers) == len(set(customers)) == 2, customers


def test_a_demo_run_again_after_its_slot_was_dropped_recovers_by_itself(
        sync_env: SyncEnv, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _demo(sync_env, tmp_path / "first", capsys)
    assert "already holds" not in first and "earlier demo runs" not in first, first
    with sync_env.crm() as crm:  # what a developer does to free the WAL a stopped demo keeps
        crm.execute("SELECT pg_drop_replication_slot(%s)", (sync_env.settings.slot_name,))
    out = _demo(sync_env, tmp_path / "second", capsys)
    assert "dropped" in out, out
    # the second run says the ERP's totals include the first run's rows
    assert "already holds" in out and "earlier demo runs' rows included" in out, out
    # the runs' letters for the same unknown product on order lines are one entry
    letters = out[out.index("dead letters (open"):].splitlines()
    entries = [x for x in letters if "MappingError: lines.product_code: CRM product code" in x]
    assert len(entries) == 1 and int(entries[0].split(" x ")[0]) >= 2, letters
    assert not any(": line [" in x for x in letters), letters
    # and that its open dead letters count the first run's too (its masked phone is one)
    assert "dead letters (open; earlier demo runs' included), and why:" in out, out
    assert "dead letters (open), and why:" in first, first


def test_the_mapped_partners_sample_shows_each_generated_person_once(
        sync_env: SyncEnv, capsys: pytest.CaptureFixture[str]) -> None:
    # F10 (newcomer7): the generator is seeded, so every demo run writes the same people
    # again under new CRM keys (1004, 1506, 2008, ...): distinct CRM rows, but a sample of
    # five that shows one person five times reads as a duplication bug. One row per person.
    with sync_env.erp() as erp:
        for key, name, phone, extension in [
                ("1004", "张三", "+8613812345678", "8001"),
                ("1506", "张三", "+8613812345678", "8001"),
                ("2008", "张三", "+8613812345678", "8001"),
                ("7", "李四", "+8613912345678", None),
                ("509", "李四", "+8613912345678", None),
                ("8", "王五", "+8613712345678", None)]:
            erp.execute(
                "INSERT INTO erp.business_partners (crm_customer_id, full_name, gender_code, "
                "phone_e164, phone_extension, province, district, source_lsn, source_seq, "
                "event_id, crm_commit_time) VALUES (%s, %s, 'M', %s, %s, '北京市', '朝阳区', "
                "1, 0, %s, now())", (key, name, phone, extension, f"e{key}"))
    print_erp_summary(sync_env.settings, earlier_runs=True)
    out = capsys.readouterr().out
    sample = [line.split(":", 1)[0].strip() for line in out.splitlines()
              if line.startswith("  CRM key ")]
    assert sample == ["CRM key 1004", "CRM key 7", "CRM key 8"], out
    assert "earlier demo runs" in out, out
