"""`--help` says what the code does (newcomer6 F9, F13): the readiness an operator's pause
gives, what stops `consume --until-caught-up`, and where `setup --check` takes its tables."""

from __future__ import annotations

import re

import pytest

from service.cli import build_parser
from service.health import Health
from service.metrics import ConsumerMetrics
from service.settings import Settings


def help_of(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*command, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse's line breaks undone


def test_pause_help_gives_the_readiness_an_operators_pause_really_has(
        capsys: pytest.CaptureFixture[str]) -> None:
    health = Health(Settings(), ConsumerMetrics())
    health.set_ready(True, "consuming")
    health.set_operator_paused(["crm.sales[0] paused by ops"])
    ready, body = health.readiness()
    said = help_of(capsys, "pause")
    assert ready
    assert f'state "{body["state"]}"' in said
    assert "/readyz 200" in said
    assert "degraded" not in said  # the circuit breaker's state, not a pause's


def test_consume_help_names_an_operators_pause_among_the_exit_1_causes(
        capsys: pytest.CaptureFixture[str]) -> None:
    said = help_of(capsys, "consume")
    causes = re.search(r"--until-caught-up .*?exit 1 if (.*?)$", said)
    assert causes is not None
    assert "circuit breaker" in causes.group(1)
    assert "operator's `pause`" in causes.group(1)
    assert "apply window" in causes.group(1)


def test_setup_check_help_says_the_tables_default_to_the_source_profiles(
        capsys: pytest.CaptureFixture[str]) -> None:
    said = help_of(capsys, "setup")
    assert "default: the source profile's (CRM_ERP_SYNC_SOURCE_PROFILE)" in said
    assert "demo CRM's" not in said
