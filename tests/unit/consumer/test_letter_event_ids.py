"""Which event a failing envelope is (the producer's event id, stable across its re-sends):
the consumer files one dead letter per event, not per offset."""

from __future__ import annotations

from service.cdc.dead_letters import CaptureDeadLetter
from service.consumer.pipeline import Envelope, Message, _envelope_event_id
from service.errors import DecodeError, MappingError


def msg() -> Message:
    return Message("crm.sales", 0, 7, 0, b"1102", b"x")


def test_a_decoded_event_is_known_by_its_event_id() -> None:
    env = Envelope(msg(), kind="order", record={"event_id": "FA6C94A68/0"},
                   error=MappingError("product", "P-HOVERBOARD", "no ERP SKU"))
    assert _envelope_event_id(env) == "FA6C94A68/0"


def test_a_capture_letter_is_known_by_its_marker_event_id() -> None:
    marker = CaptureDeadLetter("NaN", "purchase_amount", 0, 3, "UnrepresentableValue",
                               event_id="snap/1A/4")
    assert _envelope_event_id(Envelope(msg(), error=marker)) == "snap/1A/4"
    old = CaptureDeadLetter("NaN", "purchase_amount", 0, 3, "UnrepresentableValue")
    assert _envelope_event_id(Envelope(msg(), error=old)) is None  # a marker from before


def test_an_undecodable_message_has_no_event_id() -> None:
    assert _envelope_event_id(Envelope(msg(), error=DecodeError("not avro"))) is None
