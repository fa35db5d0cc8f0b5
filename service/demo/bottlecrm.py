"""Drive a real BottleCRM (PyPI django-crm 1.35.0): the tests and `make demo-bottlecrm`.

BottleCRM needs Python 3.12 and 85 packages of its own, so it lives in a venv of its own that
``deploy/bottlecrm/install.sh`` builds, with a migrated template database; each test clones
the template (``CREATE DATABASE … TEMPLATE``, a fraction of a second) and writes CRM data
through ``deploy/bottlecrm/writer.py``, a long-lived process inside that venv that calls
BottleCRM's own Django models (one JSON line per command each way).
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.settings import REPO_ROOT

INSTALL_SH = REPO_ROOT / "deploy" / "bottlecrm" / "install.sh"
WRITER_PY = REPO_ROOT / "deploy" / "bottlecrm" / "writer.py"
TEMPLATE = os.environ.get("BOTTLECRM_TEMPLATE", "bottlecrm_template")
EXIT_NO_PYTHON = 3  # install.sh's exit code when no Python 3.12 is found


class BottleCrmUnavailable(Exception):
    """BottleCRM cannot be installed here (no Python 3.12): the tests that need it skip."""


class WriterError(Exception):
    """The writer answered a command with an error (``error`` is the Python class name)."""

    def __init__(self, op: str, error: str, message: str) -> None:
        super().__init__(f"{op}: {error}: {message}")
        self.op, self.error, self.message = op, error, message


@dataclasses.dataclass(frozen=True)
class Role:
    """A PostgreSQL login role made for one test."""

    name: str
    password: str

    def dsn(self, database_dsn: str) -> str:
        parts = urlsplit(database_dsn)
        netloc = f"{self.name}:{self.password}@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))


def state_dir() -> Path:
    return Path(os.environ.get("BOTTLECRM_HOME", REPO_ROOT / ".stack" / "bottlecrm"))


def venv_python() -> Path:
    return state_dir() / "venv" / "bin" / "python"


def ensure_installed(admin_dsn: str, timeout_s: float = 1500.0) -> float:
    """Run install.sh against the PostgreSQL of ``admin_dsn`` (idempotent: seconds when done).

    Returns the wall time in seconds. Raises BottleCrmUnavailable without Python 3.12, and
    RuntimeError (with the script's last lines) on any other failure.
    """
    pg = urlsplit(admin_dsn)
    env = {**os.environ,
           "STACK_PG_HOST": pg.hostname or "127.0.0.1", "STACK_PG_PORT": str(pg.port or 5432),
           "STACK_PG_USER": pg.username or "", "STACK_PG_PASSWORD": pg.password or ""}
    started = time.monotonic()
    done = subprocess.run(["bash", str(INSTALL_SH)], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    tail = "\n".join(done.stderr.strip().splitlines()[-15:])
    if done.returncode == EXIT_NO_PYTHON:
        raise BottleCrmUnavailable(tail)
    if done.returncode != 0:
        raise RuntimeError(f"deploy/bottlecrm/install.sh failed ({done.returncode}):\n{tail}")
    return time.monotonic() - started


class Writer:
    """One writer process on one BottleCRM database; every call waits with a deadline."""

    def __init__(self, dsn: str, *, ready_timeout_s: float = 120.0) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (lives until close())
        self._proc = subprocess.Popen(
            [str(venv_python()), str(WRITER_PY), "--dsn", dsn],
            # BottleCRM's logging writes server.log and security_audit.log in its cwd
            cwd=state_dir(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        assert self._proc.stdout is not None and self._proc.stdin is not None
        self._stdin = self._proc.stdin
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._proc.stdout, selectors.EVENT_READ)
        self._buffer = b""
        ready = self._read_answer("start-up", ready_timeout_s)
        if not ready.get("ready"):
            raise RuntimeError(f"writer did not start: {ready}")

    # ---- protocol ------------------------------------------------------------------------
    def call(self, op: str, timeout_s: float = 60.0, **args: Any) -> dict[str, Any]:
        """Send one command; returns its ``result``; raises WriterError on an error answer."""
        self._stdin.write(json.dumps({"op": op, **args}, ensure_ascii=False).encode() + b"\n")
        self._stdin.flush()
        answer = self._read_answer(op, timeout_s)
        if not answer.get("ok"):
            raise WriterError(op, answer.get("error", "?"), answer.get("message", ""))
        result: dict[str, Any] = answer["result"]
        return result

    def _read_answer(self, op: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"writer gave no answer to {op} within {timeout_s:.0f}s"
                                   f"{self._stderr_tail()}")
            if not self._selector.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"writer exited ({self._proc.wait()}) during {op}"
                                   f"{self._stderr_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()[-10:]
        return ("; stderr:\n" + "\n".join(lines)) if lines else ""

    def close(self) -> None:
        if self._proc.poll() is None:
            self._stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._selector.close()
        self._stderr.close()

    # ---- CRM operations (keys are UUID strings) ------------------------------------------
    def create_org(self, name: str, currency: str = "CNY") -> str:
        return str(self.call("create_org", name=name, currency=currency)["id"])

    def create_account(self, org: str, name: str, **fields: Any) -> str:
        return str(self.call("create_account", org=org, name=name, **fields)["id"])

    def update_account(self, org: str, account: str, **fields: Any) -> None:
        self.call("update_account", org=org, account=account, fields=fields)

    def deactivate_account(self, org: str, account: str) -> None:
        self.call("deactivate_account", org=org, account=account)

    def create_contact(self, org: str, first_name: str, last_name: str,
                       account: str | None = None, **fields: Any) -> str:
        return str(self.call("create_contact", org=org, first_name=first_name,
                             last_name=last_name, account=account, **fields)["id"])

    def create_product(self, org: str, sku: str, name: str, price: str | int,
                       **fields: Any) -> str:
        return str(self.call("create_product", org=org, sku=sku, name=name, price=str(price),
                             **fields)["id"])

    def create_order(self, org: str, account: str, lines: Sequence[dict[str, Any]],
                     status: str = "DRAFT", **fields: Any) -> tuple[str, list[str]]:
        """Lines: ``{"product": id, "quantity": n, "unit_price"?: "…", "name"?: "…"}``
        (name and price default to the product's). Returns (order id, line ids in order)."""
        result = self.call("create_order", org=org, account=account, lines=list(lines),
                           status=status, **fields)
        return str(result["id"]), [str(x) for x in result["lines"]]

    def set_order_status(self, org: str, order: str, status: str) -> None:
        self.call("set_order_status", org=org, order=order, status=status)

    def update_order(self, org: str, order: str, **fields: Any) -> None:
        self.call("update_order", org=org, order=order, fields=fields)

    def add_line(self, org: str, order: str, **line: Any) -> str:
        return str(self.call("add_line", org=org, order=order, **line)["id"])

    def update_line(self, org: str, line: str, **fields: Any) -> None:
        self.call("update_line", org=org, line=line, fields=fields)

    def delete_line(self, org: str, line: str) -> None:
        self.call("delete_line", org=org, line=line)

    def delete_order(self, org: str, order: str) -> None:
        self.call("delete_order", org=org, order=order)
