"""Money is an exact count of picodollars; floats never become money."""

from __future__ import annotations

import pickle
from dataclasses import FrozenInstanceError
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshrt.shared.money import PICODOLLARS_PER_USD
from meshrt.shared.money import Money
from meshrt.shared.money import per_minute_cost


def test_money_wraps_an_integer_count_of_picodollars():
    assert Money(31_744_000_000).picodollars == 31_744_000_000
    assert PICODOLLARS_PER_USD == 10**12


@pytest.mark.parametrize("bad", [1.0, Decimal("1"), "1", True, None])
def test_money_constructor_takes_only_an_int(bad):
    with pytest.raises(TypeError):
        Money(bad)


def test_money_is_immutable_and_hashable():
    money = Money(5)
    with pytest.raises(FrozenInstanceError):
        money.picodollars = 6  # type: ignore[misc]
    assert {Money(5), Money(5), Money(6)} == {Money(5), Money(6)}


def test_money_pickles():
    assert pickle.loads(pickle.dumps(Money(-42))) == Money(-42)


def test_money_adds_subtracts_negates_and_multiplies_by_int():
    a, b = Money(700), Money(300)
    assert a + b == Money(1000)
    assert a - b == Money(400)
    assert b - a == Money(-400)
    assert -a == Money(-700)
    assert a * 3 == Money(2100)
    assert 3 * a == Money(2100)
    assert abs(Money(-3)) == Money(3)


def test_sum_of_money_works_without_a_start_value():
    assert sum([Money(1), Money(2), Money(3)]) == Money(6)
    assert sum([], Money.ZERO) == Money.ZERO


@pytest.mark.parametrize(
    "operation",
    [
        lambda m: m + 0.5,
        lambda m: 0.5 + m,
        lambda m: m - 0.5,
        lambda m: m * 1.5,
        lambda m: 1.5 * m,
        lambda m: m * Decimal("2"),
        lambda m: m * True,
        lambda m: m + 1,
        lambda m: 1 + m,
        lambda m: m + Decimal("1"),
        lambda m: m * m,
    ],
)
def test_money_refuses_floats_and_bare_numbers(operation):
    with pytest.raises(TypeError):
        operation(Money(10))


def test_money_orders_only_against_money():
    assert Money(1) < Money(2) <= Money(2) < Money(3)
    assert max(Money(-5), Money(7)) == Money(7)
    assert Money(0) != 0
    with pytest.raises(TypeError):
        _ = Money(1) < 2


def test_zero_is_falsy_and_other_amounts_truthy():
    assert not Money.ZERO
    assert Money(-1)
    assert Money.ZERO == Money(0)


@pytest.mark.parametrize(
    ("text", "picodollars"),
    [
        ("0.031744", 31_744_000_000),
        ("4", 4 * 10**12),
        ("0.000000000001", 1),
        ("-1.5", -1_500_000_000_000),
        ("0.40", 400_000_000_000),
        ("1.000000000000000000", 10**12),
        ("1E-6", 1_000_000),
        ("0", 0),
    ],
)
def test_from_usd_is_exact(text, picodollars):
    assert Money.from_usd(text).picodollars == picodollars
    assert Money.from_usd(Decimal(text)).picodollars == picodollars


def test_from_usd_accepts_an_int():
    assert Money.from_usd(3) == Money(3 * 10**12)


@pytest.mark.parametrize("bad", [0.1, 1.0, True, None, b"1"])
def test_from_usd_refuses_floats_and_other_types(bad):
    with pytest.raises(TypeError):
        Money.from_usd(bad)


@pytest.mark.parametrize(
    "bad", ["0.0000000000001", "1e-13", "abc", "", "NaN", "Infinity", "-inf", "1E+999999999", "1E-999999999", "1,5"]
)
def test_from_usd_refuses_values_that_are_not_whole_picodollars(bad):
    with pytest.raises(ValueError):
        Money.from_usd(bad)


@pytest.mark.parametrize(
    ("picodollars", "text"),
    [
        (0, "0.000000"),
        (31_744_000_000, "0.031744"),
        (1, "0.000000000001"),
        (-1, "-0.000000000001"),
        (12_500_000_000_000, "12.500000"),
        (-31_744_000_000, "-0.031744"),
        (1_234_567_891_000, "1.234567891"),
        (10**18, "1000000.000000"),
    ],
)
def test_usd_str_has_six_decimals_and_more_only_when_needed(picodollars, text):
    assert Money(picodollars).usd_str() == text


def test_usd_str_can_use_fewer_minimum_decimals():
    assert Money.from_usd("4").usd_str(min_decimals=2) == "4.00"
    assert Money.from_usd("0.006").usd_str(min_decimals=2) == "0.006"


def test_str_and_repr_show_usd():
    assert str(Money.from_usd("-2.5")) == "-$2.500000"
    assert repr(Money(1)) == "Money.from_usd('0.000000000001')"


@given(st.integers(min_value=-(10**27), max_value=10**27))
def test_usd_str_round_trips_through_from_usd(picodollars):
    money = Money(picodollars)
    assert Money.from_usd(money.usd_str()) == money
    assert "e" not in money.usd_str().lower()


def test_per_minute_cost_is_exact_when_it_can_be():
    # $0.006 per minute for 90 s = $0.009
    assert per_minute_cost(Money.from_usd("0.006"), Decimal("90")) == Money.from_usd("0.009")
    # whisper-1, 2.345 s: 0.006 * 2.345 / 60 = 0.0002345 exactly
    assert per_minute_cost(Money.from_usd("0.006"), Decimal("2.345")) == Money.from_usd("0.0002345")


def test_per_minute_cost_rounds_half_up_to_the_picodollar():
    # 1 pd/min for 30 s is exactly 0.5 pd: rounds up to 1.
    assert per_minute_cost(Money(1), Decimal("30")) == Money(1)
    assert per_minute_cost(Money(1), Decimal("29.999")) == Money(0)
    assert per_minute_cost(Money(3), Decimal("50")) == Money(3)  # 2.5 → 3
    # $0.017/min for 1 s = 17e9/60 pd = 283_333_333.33… → 283_333_333
    assert per_minute_cost(Money.from_usd("0.017"), Decimal(1)) == Money(283_333_333)
    # for 2 s = 566_666_666.66… → 566_666_667
    assert per_minute_cost(Money.from_usd("0.017"), 2) == Money(566_666_667)


def test_per_minute_cost_rounds_ties_away_from_zero_for_negative_rates():
    assert per_minute_cost(Money(-1), Decimal("30")) == Money(-1)


def test_per_minute_cost_of_zero_seconds_is_zero():
    assert per_minute_cost(Money.from_usd("0.017"), Decimal("0")) == Money.ZERO


@pytest.mark.parametrize("seconds", [1.5, "1.5", None])
def test_per_minute_cost_refuses_float_seconds(seconds):
    with pytest.raises(TypeError):
        per_minute_cost(Money(1), seconds)


@pytest.mark.parametrize(
    "seconds", [Decimal("-1"), Decimal("NaN"), Decimal("Infinity"), Decimal("1E+20"), Decimal("1E-999")]
)
def test_per_minute_cost_refuses_negative_or_absurd_seconds(seconds):
    with pytest.raises(ValueError):
        per_minute_cost(Money(1), seconds)


def test_per_minute_cost_needs_a_money_rate():
    with pytest.raises(TypeError):
        per_minute_cost(0.006, Decimal(1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("usd", "shown"),
    [
        ("-0.0001648", "-$0.000165"),  # the sign before the dollar, rounded to the millionth
        ("0", "$0.000000"),
        ("25", "$25.000000"),
        ("1250", "$1,250.000000"),
        ("0.0000005", "$0.000001"),  # half away from zero
        ("-0.0000005", "-$0.000001"),
        ("0.0000004", "$0.0000004"),  # would round to nothing: shown exact
        ("-0.000000000001", "-$0.000000000001"),
        ("0.001983333333", "$0.001983"),
        ("1234567.8999995", "$1,234,567.900000"),
    ],
)
def test_display_is_what_a_person_reads(usd, shown):
    assert Money.from_usd(usd).display() == shown


@given(st.integers(min_value=-(10**20), max_value=10**20))
def test_display_is_within_half_a_millionth_and_never_hides_a_charge(pico):
    shown = Money(pico).display()
    assert shown.startswith("-$" if pico < 0 else "$")
    back = Money.from_usd(shown.lstrip("-$").replace(",", ""))
    assert abs(abs(back.picodollars) - abs(pico)) <= 500_000  # half of 1e-6 USD
    assert (back.picodollars == 0) == (pico == 0)
