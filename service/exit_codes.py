"""The exit codes of every `crm-erp-sync` command: one table, the same code for the same
condition everywhere (documented in README.md, "Exit codes").

- 0 OK: done; or nothing needs attention.
- 1 ATTENTION: done, but something needs an operator: `status` found a problem, `reconcile`
  found drift, a redrive failed again, an action was refused because of the object's state
  (a dead letter already redriven, a replay while the group has members), or `consume
  --until-caught-up` stopped at partitions the circuit breaker or an operator's `pause`
  keeps paused. Resuming a
  partition that is not paused is not refused: a no-op, 0.
- 2 USAGE: bad arguments or configuration, including a named object that does not exist (a
  dead-letter ID, a snapshot key, a partition the group does not consume), a filter value
  that matches nothing known, database credentials or a database name that the server
  refuses, a privilege the DSN's role lacks (``PrivilegeMissing``: the object and the
  grant named), and a TLS or SASL mistake (a CA file that does not exist, TLS demanded of a
  server without it, a certificate that does not verify, a protocol the Kafka listener does
  not speak, a refused SASL login: ``DatabaseTlsFailed``, ``service.kafka_io``).
- 3 UNAVAILABLE: the broker or a database did not answer.
- 130 INTERRUPTED: Ctrl-C.
- 141 BROKEN_PIPE: the reader of the output went away (`crm-erp-sync dlq list | head`); the
  command ends quietly with the code of a Unix tool killed by SIGPIPE (128 + 13), so that
  `set -o pipefail` still tells a truncated run from a complete one. Only stdout's own pipe:
  another BrokenPipeError (a library's socket) is an unexpected error, code 1.

Code 4 (the circuit breaker stopped the consumer) is gone: the breaker pauses a partition and
the consumer keeps running.
"""

OK, ATTENTION, USAGE, UNAVAILABLE, INTERRUPTED = 0, 1, 2, 3, 130
BROKEN_PIPE = 141

EPILOG = ("Exit codes: 0 ok, 1 needs attention (problem found, drift, or refused by state), "
          "2 bad arguments or configuration (also: no such ID, unknown filter value, database "
          "credentials refused, TLS/SASL mistakes), 3 broker or database unreachable, "
          "130 interrupted, 141 output pipe closed.")
