"""Budgets' arithmetic (gateway/budgets.py): fixed windows, request and token counts
per key and per tenant, what a refusal says."""

from __future__ import annotations

import pytest

from thaw.core.errors import InvalidArgument
from thaw.gateway.budgets import (
    DAY,
    MINUTE,
    BudgetBook,
    BudgetExceeded,
    StreamTokens,
    answer_tokens,
    counts_tokens,
    parse_budgets,
    usage_tokens,
    window,
)
from thaw.gateway.errors import error_response, status_of
from thaw.proto import scheduler_pb2

# A moment 10 s into a UTC day (and so into a minute).
T0 = 20_000 * DAY + 10.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def principal(key: scheduler_pb2.Budgets | None = None,
              tenant: scheduler_pb2.Budgets | None = None,
              key_id: str = "k1") -> scheduler_pb2.Principal:
    return scheduler_pb2.Principal(tenant="acme", key_id=key_id, scopes=["invoke"],
                                   key_budgets=key, tenant_budgets=tenant)


def test_windows_are_fixed_minutes_and_utc_days() -> None:
    assert window(MINUTE, T0) == (int(T0 // 60), 50.0)
    index, left = window(DAY, T0)
    assert index == 20_000 and left == DAY - 10.0
    assert window(DAY, (20_001) * DAY) == (20_001, DAY)


def test_requests_per_day_refuse_the_call_past_the_budget() -> None:
    clock = Clock(T0)
    book = BudgetBook(clock)
    p = principal(scheduler_pb2.Budgets(rpd=2))
    book.admit(p)
    book.admit(p)
    with pytest.raises(BudgetExceeded) as refused:
        book.admit(p)
    exc = refused.value
    assert exc.field == "rpd" and exc.code == "budget_exceeded"
    assert "2 requests per day" in exc.message and "API key" in exc.message
    assert exc.retry_after == DAY - 10.0
    assert status_of(exc) == 429
    answer = error_response(exc)
    assert answer.headers["Retry-After"] == str(int(DAY - 10))
    # A refused call is not counted; the next day starts from zero.
    assert book.used("key:k1", "rpd") == 2
    clock.now = T0 + DAY
    book.admit(p)
    assert book.used("key:k1", "rpd") == 1


def test_requests_per_minute_free_at_the_next_minute() -> None:
    clock = Clock(T0)
    book = BudgetBook(clock)
    p = principal(scheduler_pb2.Budgets(rpm=1))
    book.admit(p)
    with pytest.raises(BudgetExceeded) as refused:
        book.admit(p)
    assert refused.value.field == "rpm" and refused.value.retry_after == 50.0
    clock.now = T0 + 50.0
    book.admit(p)


def test_tenant_budget_is_shared_by_its_keys_and_key_budgets_are_not() -> None:
    book = BudgetBook(Clock(T0))
    tenant = scheduler_pb2.Budgets(rpd=3)
    a = principal(scheduler_pb2.Budgets(rpd=10), tenant, key_id="a")
    b = principal(None, tenant, key_id="b")
    book.admit(a)
    book.admit(b)
    book.admit(a)
    with pytest.raises(BudgetExceeded) as refused:
        book.admit(b)
    assert refused.value.field == "rpd" and "tenant acme" in refused.value.message
    assert book.used("key:a", "rpd") == 2
    # A key's own budget refuses it alone.
    other = BudgetBook(Clock(T0))
    c = principal(scheduler_pb2.Budgets(rpd=1), key_id="c")
    d = principal(scheduler_pb2.Budgets(rpd=1), key_id="d")
    other.admit(c)
    other.admit(d)
    with pytest.raises(BudgetExceeded):
        other.admit(c)


def test_a_refusal_by_the_tenant_counts_nothing_against_the_key() -> None:
    book = BudgetBook(Clock(T0))
    p = principal(scheduler_pb2.Budgets(rpd=5), scheduler_pb2.Budgets(rpm=1))
    book.admit(p)
    with pytest.raises(BudgetExceeded):
        book.admit(p)
    assert book.used("key:k1", "rpd") == 1


def test_tokens_refuse_the_next_call_once_spent() -> None:
    clock = Clock(T0)
    book = BudgetBook(clock)
    p = principal(scheduler_pb2.Budgets(tpm=100, tpd=1000))
    assert counts_tokens(p)
    book.check_tokens(p)
    book.spend(p, 60)
    book.check_tokens(p)
    book.spend(p, 60)  # the call that crosses the budget completed
    with pytest.raises(BudgetExceeded) as refused:
        book.check_tokens(p)
    assert refused.value.field == "tpm" and "tokens per minute" in refused.value.message
    clock.now = T0 + 50.0
    book.check_tokens(p)
    book.spend(p, 900)
    with pytest.raises(BudgetExceeded) as refused:
        book.check_tokens(p)
    assert refused.value.field == "tpd" and refused.value.retry_after == DAY - 60.0


def test_no_budgets_count_nothing() -> None:
    book = BudgetBook(Clock(T0))
    p = principal()
    for _ in range(100):
        book.admit(p)
    book.spend(p, 10**6)
    book.check_tokens(p)
    assert not counts_tokens(p)
    assert not counts_tokens(principal(scheduler_pb2.Budgets(rpd=5)))
    assert book.used("key:k1", "rpd") == 0


def test_usage_reading() -> None:
    assert usage_tokens({"usage": {"prompt_tokens": 5, "completion_tokens": 7}}) == 12
    assert usage_tokens({"usage": {"prompt_tokens": 5, "total_tokens": 5}}) == 5
    assert usage_tokens({"usage": {"total_tokens": 9}}) == 9
    assert usage_tokens({"usage": {"prompt_tokens": True, "completion_tokens": -3}}) == 0
    assert usage_tokens({"choices": []}) == 0 and usage_tokens([1]) == 0
    assert answer_tokens(b'{"usage": {"prompt_tokens": 2, "completion_tokens": 3}}') == 5
    assert answer_tokens(b"not json") == 0
    stream = StreamTokens()
    for data in ('{"choices": [{"delta": {"content": "a"}}]}',
                 '{"choices": [{"delta": {"content": "b"}}]}', "", '{"error": {}}'):
        stream.feed(data)
    assert stream.total == 2  # one per chunk when no usage is reported
    stream.feed('{"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}')
    assert stream.total == 6


def test_parse_budgets() -> None:
    assert parse_budgets({"name": "x"}) is None
    made = parse_budgets({"rpd": 2, "tpm": None, "tpd": 0})
    assert made is not None and made.rpd == 2 and made.tpm == 0 and made.tpd == 0
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(InvalidArgument) as refused:
            parse_budgets({"tpd": bad})
        assert refused.value.field == "tpd"
    with pytest.raises(InvalidArgument):
        parse_budgets({}, required=True)
