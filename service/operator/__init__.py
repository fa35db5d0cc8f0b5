"""The operator's toolkit: status, replay, dead letters, reconciliation.

Each module returns plain data (dataclasses / dicts); ``render`` turns it into a table or
JSON; ``service.cli`` only parses arguments and picks the exit code.
"""
