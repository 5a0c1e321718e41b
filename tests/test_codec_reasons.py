"""Pure logic: why the codec rejects a message that is valid JSON but not a valid tick.

The reasons come from checking the fields against WireTick's declaration, not from msgspec's
message text. Each expectation below is the reason the earlier text-parsing classifier gave
(checked against it on 200k random payloads before it was removed).
"""

from __future__ import annotations

import pytest

from nadi.codec import Reason, Rejected, TickCodec

codec = TickCodec(max_future_skew_s=1e12, max_age_s=1e12)
OK = '"instrument_token":1,"sequence_id":0,"exchange_ts":1700000000000000000,"last_price":10.5'
BIG = "9" * 400  # an integer literal beyond float range

CASES: list[tuple[str, Reason]] = [
    ("[1, 2]", Reason.NOT_OBJECT),
    ('"tick"', Reason.NOT_OBJECT),
    ("null", Reason.NOT_OBJECT),
    ("{}", Reason.MISSING_FIELD),
    ('{"instrument_token":1}', Reason.MISSING_FIELD),
    ("{" + OK + ',"last_qty":-1}', Reason.OUT_OF_RANGE),
    ("{" + OK + ',"bid":1e999}', Reason.NON_FINITE),
    ('{"instrument_token":1e999,"sequence_id":0}', Reason.NON_FINITE),
    (
        '{"instrument_token":1,"sequence_id":0,"exchange_ts":1,"last_price":' + BIG + "}",
        Reason.NON_FINITE,
    ),
    (
        '{"instrument_token":1,"sequence_id":0,"exchange_ts":1,"last_price":1e-999}',
        Reason.OUT_OF_RANGE,
    ),
    ('{"instrument_token":true,"sequence_id":0}', Reason.WRONG_TYPE),
    ('{"instrument_token":"1","sequence_id":0}', Reason.WRONG_TYPE),
    ('{"instrument_token":1.0,"sequence_id":0}', Reason.WRONG_TYPE),
    ('{"instrument_token":0,"sequence_id":-1}', Reason.OUT_OF_RANGE),
    ('{"sequence_id":-1,"instrument_token":"x"}', Reason.OUT_OF_RANGE),  # document order
    ('{"last_price":0}', Reason.OUT_OF_RANGE),  # before the missing fields
    ('{"instrument_token":1,"sequence_id":0,"exchange_ts":null,"last_price":1}', Reason.WRONG_TYPE),
    ('{"instrument_token":1,"sequence_id":0,"exchange_ts":1.5,"last_price":1}', Reason.WRONG_TYPE),
    ('{"instrument_token":1,"sequence_id":0,"exchange_ts":[1],"last_price":1}', Reason.WRONG_TYPE),
    ("{" + OK + ',"exchange":"XXX"}', Reason.WRONG_TYPE),
    ("{" + OK + ',"exchange":1}', Reason.WRONG_TYPE),
    ("{" + OK + ',"exchange":' + BIG + "}", Reason.NON_FINITE),
    ("{" + OK + ',"feed":1}', Reason.WRONG_TYPE),
    ("{" + OK + ',"feed":-' + BIG + "}", Reason.NON_FINITE),
    ("{" + OK + ',"volume":1.0}', Reason.WRONG_TYPE),
    ("{" + OK + ',"volume":-' + "9" * 25 + "}", Reason.OUT_OF_RANGE),
    ("{" + OK + ',"last_price":null}', Reason.WRONG_TYPE),
    ('{"instrument_token":1,"instrument_token":-1,"sequence_id":0}', Reason.OUT_OF_RANGE),
    ('{"junk":1e999,"instrument_token":1}', Reason.MISSING_FIELD),  # unknown fields are skipped
]


@pytest.mark.parametrize(("payload", "reason"), CASES)
def test_reason_of_invalid_tick(payload: str, reason: Reason) -> None:
    with pytest.raises(Rejected) as e:
        codec.decode(payload.encode())
    assert e.value.reason == reason, e.value.detail


@pytest.mark.parametrize(
    "payload",
    ["{" + OK + "}", "{" + OK + ',"junk":{"a":1e999},"exchange":"NSE","volume":' + "9" * 25 + "}"],
)
def test_valid_payloads_are_not_rejected(payload: str) -> None:
    assert codec.decode(payload.encode()).instrument_token == 1


def test_bad_field_before_bad_syntax_is_bad_json() -> None:
    # msgspec stops at the bad field, so the message is a ValidationError; it is not JSON.
    with pytest.raises(Rejected) as e:
        codec.decode(b'{"instrument_token":0, oops')
    assert e.value.reason == Reason.BAD_JSON
