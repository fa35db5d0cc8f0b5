"""The command-line layer without the stack: a closed output pipe, argument ranges, usage
and help texts, configuration checked by every command."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, close_stdout: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRM_ERP_SYNC_")}
    argv = [sys.executable, "-m", "service.cli", *args]
    if not close_stdout:
        return subprocess.run(argv, cwd=REPO, env={**clean, **env}, capture_output=True,
                              text=True, timeout=60, check=False)
    # The reader goes away before the command writes (`| head` that already has its lines).
    with subprocess.Popen(argv, cwd=REPO, env={**clean, **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
    return subprocess.CompletedProcess(argv, code, "", err)


def test_a_closed_output_pipe_ends_the_command_quietly() -> None:
    done = run("config", close_stdout=True)
    assert done.returncode == 141, done.stderr
    assert "unexpected_error" not in done.stderr
    assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr
    assert run("config", "--json").returncode == 0  # an open pipe: as before
    assert json.loads(run("config", "--json").stdout)


def test_a_broken_pipe_that_is_not_stdouts_is_an_internal_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A library's socket breaking (the broker's, say) is no `| head`: logged as an
    unexpected error (class and frames, never the message) with the internal-error code."""
    from service import cli, exit_codes

    def a_library_socket_breaks(settings: object, args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe writing 张三 138xxxx5678")

    monkeypatch.setattr(cli, "cmd_config", a_library_socket_breaks)
    # main() would configure logging onto the captured stderr, outliving this test
    monkeypatch.setattr("service.log.configure", lambda *args, **kwargs: None)
    for name in [k for k in os.environ if k.startswith("CRM_ERP_SYNC_")]:
        monkeypatch.delenv(name)
    code = cli.main(["config"])
    err = capsys.readouterr().err
    assert code == exit_codes.ATTENTION != exit_codes.BROKEN_PIPE
    line = json.loads(err.strip().splitlines()[-1])
    assert (line["event"], line["error"]) == ("unexpected_error", "BrokenPipeError")
    assert any("a_library_socket_breaks" in f for f in line["frames"])
    assert "张三" not in err and "138xxxx5678" not in err and "Traceback" not in err


def test_stdouts_pipe_is_closed_only_when_its_reader_is_gone(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.cli import _stdout_pipe_closed

    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert not _stdout_pipe_closed()  # a reader is there
        os.close(read_end)
        assert _stdout_pipe_closed()  # `| head` went away
    with open(tmp_path / "out.txt", "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert not _stdout_pipe_closed()  # a file never is
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert not _stdout_pipe_closed()  # no descriptor at all


@pytest.mark.parametrize(("argv", "says"), [
    (["status", "--max-lag", "-1"], "--max-lag: must be 0 or more"),
    (["consume", "--until-idle", "-5"], "--until-idle: must be 0 or more seconds"),
    (["consume", "--until-idle", "nan"], "--until-idle: must be 0 or more seconds"),
    (["resync", "--wait", "-1"], "--wait: must be 0 or more seconds"),
    (["resync", "--chunk-size", "0"], "--chunk-size: must be 1-100000"),
    (["reconcile", "--wait", "-1"], "--wait: must be 0 or more seconds"),
    (["reconcile", "--chunk-size", "-3"], "--chunk-size: must be 1-100000"),
    (["reconcile", "--limit", "-1"], "--limit: must be 0 or more"),
    (["snapshot", "--table", "customer", "--chunk-size", "0"], "--chunk-size: must be 1-"),
    (["snapshot", "cancel", "0"], "ID: must be 1 or more"),
    (["replay", "--topic", "crm.sales", "--from-beginning", "--partition", "-1"],
     "--partition: must be 0 or more"),
    (["dlq", "show", "-1"], "ID: must be 1 or more"),
    (["dlq", "redrive", "0"], "ID: must be 1 or more"),
    (["dlq", "discard", "x", "--reason", "r"], "ID: expected a whole number, got 'x'"),
    (["demo", "load", "--customers", "-1"], "--customers: must be 0 or more"),
    (["demo", "load", "--rate", "0"], "--rate: must be above 0"),
    (["demo", "run", "--orders", "-2"], "--orders: must be 0 or more"),
])
def test_a_number_out_of_range_is_refused_naming_the_option(
        argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_numbers_in_range_are_parsed() -> None:
    parser = build_parser()
    assert parser.parse_args(["status", "--max-lag", "0"]).max_lag == 0
    assert parser.parse_args(["consume", "--until-idle", "0.5"]).until_idle == 0.5
    assert parser.parse_args(["resync", "--wait", "0"]).wait == 0.0
    assert parser.parse_args(["dlq", "redrive", "1", "2"]).ids == [1, 2]


@pytest.mark.parametrize(("argv", "usage"), [
    (["stock", "recount", "--bogus"], "usage: crm-erp-sync stock recount"),
    (["config", "--bogus"], "usage: crm-erp-sync config"),
    (["dlq", "list", "--bogus"], "usage: crm-erp-sync dlq list"),
    (["dlq", "--bogus", "list"], "usage: crm-erp-sync dlq "),
])
def test_an_unknown_option_shows_the_subcommands_usage(
        argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith(usage) and "unrecognized arguments: --bogus" in err


def test_every_option_has_help() -> None:
    def walk(parser: argparse.ArgumentParser, path: str) -> list[str]:
        missing = []
        for action in parser._actions:  # argparse has no public walk over its parsers
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    missing += walk(child, f"{path} {name}")
            elif action.option_strings and not action.help:
                missing.append(f"{path} {action.option_strings[0]}")
        return missing

    assert walk(build_parser(), "crm-erp-sync") == []


_REFUSED = [
    ("CRM_ERP_SYNC_SOURCE_PROFILE", "nosuch", "no shipped profile 'nosuch'"),
    ("CRM_ERP_SYNC_SOURCE_PROFILE", "/nonexistent/crm.toml", "no such file"),
    ("CRM_ERP_SYNC_MAPPINGS_FILE", "/nonexistent", "no such file"),
    ("CRM_ERP_SYNC_APPLY_WINDOW_TZ", "Mars/Base", "unknown time zone"),  # no window set
]


# `status` reports a missing profile or mappings file under NEEDS ATTENTION (exit 1) instead
# of refusing to run (newcomer8 N1/N7): test_status_is_not_refused_for_a_missing_file and
# tests/integration/operator/test_status_config_files.py. It still refuses an unknown zone.
@pytest.mark.parametrize(("command", "variable", "value", "says"), [
    (command, *case) for command in (["status"], ["dlq", "list"], ["config"])
    for case in _REFUSED
    if command != ["status"] or case[0] == "CRM_ERP_SYNC_APPLY_WINDOW_TZ"])
def test_every_command_refuses_a_missing_file_or_zone_naming_the_variable(
        command: list[str], variable: str, value: str, says: str) -> None:
    # exit 2 before any connection: nothing listens at these DSNs
    done = run(*command, **{variable: value,
                            "CRM_ERP_SYNC_ERP_DSN": "postgresql://x@127.0.0.1:1/none",
                            "CRM_ERP_SYNC_CRM_DSN": "postgresql://x@127.0.0.1:1/none"})
    assert done.returncode == 2, done.stderr
    assert f"configuration error: {variable}: {says}" in done.stderr


@pytest.mark.parametrize("variable", ["CRM_ERP_SYNC_MAPPINGS_FILE",
                                      "CRM_ERP_SYNC_SOURCE_PROFILE"])
def test_status_is_not_refused_for_a_missing_file(variable: str, tmp_path: Path) -> None:
    """N1/N7 (newcomer8): the operator needs `status` exactly when a file went missing; it
    names it under NEEDS ATTENTION (integration test) instead of exit 2 with nothing else.
    Another invalid setting still refuses it (exit 2) before any connection."""
    done = run("status", CRM_ERP_SYNC_LOG_FORMAT="xml",
               **{variable: str(tmp_path / "gone.toml")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "crm-erp-sync: configuration error: CRM_ERP_SYNC_LOG_FORMAT: must be 'json' or "
        "'console'"]


def test_every_configuration_error_is_its_own_line() -> None:
    done = run("dlq", "list", CRM_ERP_SYNC_LOG_FORMAT="xml",
               CRM_ERP_SYNC_TOPIC_PARTITIONS="six", CRM_ERP_SYNC_MAPPINGS_FILE="/nonexistent")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 3 and all(
        line.startswith("crm-erp-sync: configuration error: CRM_ERP_SYNC_") for line in lines)
    for variable in ("LOG_FORMAT", "TOPIC_PARTITIONS", "MAPPINGS_FILE"):
        assert any(f"CRM_ERP_SYNC_{variable}: " in line for line in lines), variable


def test_config_names_an_invalid_mappings_file_and_its_key(tmp_path: Path) -> None:
    broken = tmp_path / "mappings.toml"
    broken.write_text('[order_status]\n"已发货" = 42\n', encoding="utf-8")
    done = run("config", CRM_ERP_SYNC_MAPPINGS_FILE=str(broken))
    assert done.returncode == 2, done.stderr
    assert "mappings file invalid (CRM_ERP_SYNC_MAPPINGS_FILE)" in done.stderr
    assert f'{broken}: order_status."已发货": must be a quoted string' in done.stderr
    assert run("config").returncode == 0  # the shipped files are valid


def test_a_long_running_process_freezes_what_it_loaded_at_start() -> None:
    # in a child: gc.freeze is for the process's whole life
    code = ("import gc, service.consumer.pipeline\n"
            "from service.erp.divisions import divisions\n"
            "from service.cli import freeze_startup_heap\n"
            "divisions(); before = len(gc.get_objects()); freeze_startup_heap()\n"
            "print(gc.get_freeze_count() >= before * 0.9, len(gc.get_objects()) < 1000,"
            " gc.get_threshold()[0])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    from service.cli import YOUNG_COLLECTION_THRESHOLD
    assert done.stdout.split() == ["True", "True", str(YOUNG_COLLECTION_THRESHOLD)], done.stderr


def test_setup_says_what_it_created_and_what_was_there() -> None:
    from service.cli import setup_lines
    from service.settings import Settings
    from service.setup import SetupReport

    settings = Settings()
    created = setup_lines(settings, SetupReport(["crm.sales", "crm.dlq"], True))
    assert created[:2] == ["topics: created crm.sales, crm.dlq",
                           "demo CRM tables: created (the CRM had none)"]
    assert settings.publication_name in created[2] and settings.slot_name in created[2]
    again = setup_lines(settings, SetupReport([], False))
    assert again[0] == "topics: all existed already"
    assert not any("demo CRM" in line or "{" in line for line in again)
    assert "creates its slot" in again[1]


def test_setup_says_the_tryton_target_gets_no_erp_tables() -> None:
    import dataclasses

    from service.cli import setup_lines
    from service.settings import Settings
    from service.setup import SetupReport

    sql = setup_lines(Settings(), SetupReport([], False))
    assert sql[-1] == "ERP: schema sync in place"
    tryton = setup_lines(dataclasses.replace(Settings(), erp_target="tryton"),
                         SetupReport([], False))
    assert tryton[-1] == ("ERP: schema sync in place (ERP target tryton: no erp.* tables, "
                          "the ERP is Tryton)")


def test_setup_does_not_promise_a_slot_that_exists() -> None:
    # A second `setup`, after the producer ran, said "(the producer creates its slot ...
    # when it first starts)" although the slot was there.
    from service.cli import setup_lines
    from service.settings import Settings
    from service.setup import SetupReport

    settings = Settings()
    [_, crm, _] = setup_lines(settings, SetupReport([], False, slot_exists=True))
    assert crm.endswith(f"; slot {settings.slot_name} exists")
    assert "creates its slot" not in crm


def test_setup_says_which_publication_tables_it_repaired_and_resnapshotted() -> None:
    # F14/F15: `setup` re-added a table (or changed its filter) and said only "in place".
    from service.cdc.capture import PublicationDrift, Repair
    from service.cli import setup_lines
    from service.settings import Settings
    from service.setup import SetupReport

    settings = Settings()
    gone = PublicationDrift("pub", "public.accounts", True, None, "(org_id = 'x'::uuid)")
    moved = PublicationDrift("pub", "public.orders", False, "(org_id = 'a'::uuid)",
                             "(org_id = 'b'::uuid)")
    lines = setup_lines(settings, SetupReport([], False, True, [Repair(gone, 7),
                                                                  Repair(moved, 8)]))
    assert ("CRM: added public.accounts back to publication pub; requested snapshot 7 of it "
            "(changes made meanwhile were not captured; the producer re-reads the table)"
            ) in lines
    assert ("CRM: changed the row filter of public.orders in publication pub from "
            "(org_id = 'a'::uuid) to (org_id = 'b'::uuid); requested snapshot 8 of it "
            "(changes made meanwhile were not captured; the producer re-reads the table)"
            ) in lines
    before_slot = setup_lines(settings, SetupReport([], False, False, [Repair(gone, None)]))
    assert ("CRM: added public.accounts back to publication pub; the producer's first start "
            "snapshots every table") in before_slot


def test_a_refused_privilege_not_caught_by_name_gives_the_erp_advice_too() -> None:
    # newcomer9 F6: an ERP refusal got the CRM capture role's advice alone
    import psycopg

    from service.cli import _privilege_refused

    line = _privilege_refused(psycopg.errors.InsufficientPrivilege())
    assert line is not None
    assert "setup --check --role ROLE" in line and "the consumer's ERP grants" in line
    assert _privilege_refused(ValueError("x")) is None
