"""Money: an exact amount of US dollars, counted in integer picodollars.

One picodollar is 1e-12 USD. A rate of up to 6 decimals of USD per 1M tokens is then a whole
number of picodollars per token (``$0.06 / 1M = 60_000 pd``), so the cost of any token count is an
exact integer product: no rounding happens anywhere in token billing.

Invariants:

- A ``Money`` wraps an ``int`` and nothing else. Binary floats are refused at every door
  (constructor, ``+``, ``*``, ``from_usd``) with ``TypeError``: a float that slipped in is a bug to
  find, not a value to round.
- There is exactly one place where rounding happens: :func:`per_minute_cost`, which rounds the
  exact rational result half up (away from zero) to the picodollar.
- The text form is a plain decimal string in USD (``usd_str``) — what the API, the records and the
  docs show; ``Money.from_usd(m.usd_str()) == m`` for every ``m``.
- What a person reads (the CLI, the dashboard, ``meshrt dev``) is ``display``: ``-$0.000165``,
  ``$1,250.000000`` — sign before the dollar, rounded to the millionth of a dollar.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import ClassVar

__all__ = ["Money", "PICODOLLARS_PER_USD", "per_minute_cost"]

PICODOLLARS_PER_USD = 10**12
_USD_PLACES = 12
# Larger amounts are certainly a typo (or an attack on the exponent): 1e15 USD.
_MAX_ADJUSTED_EXPONENT = 15


def _is_plain_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(op: str, other: object) -> TypeError:
    return TypeError(
        f"Money {op} {type(other).__name__} is not allowed: money only combines with Money "
        "(and multiplies by int); binary floats are never money"
    )


@dataclass(frozen=True, slots=True, order=True)
class Money:
    """An exact amount of USD: ``Money(picodollars)``; ``Money.from_usd("0.031744")``.

    Immutable, hashable and ordered (only against other ``Money``). Supports ``+``/``-`` with
    ``Money``, unary ``-``, ``* int``, and ``sum()`` (``0 + m`` is ``m``).
    """

    picodollars: int
    ZERO: ClassVar[Money]

    def __post_init__(self) -> None:
        if not _is_plain_int(self.picodollars):
            raise TypeError(
                "Money() takes an int count of picodollars, not "
                f"{type(self.picodollars).__name__}; use Money.from_usd() for a USD string"
            )

    @classmethod
    def from_usd(cls, amount: str | Decimal | int) -> Money:
        """The exact amount for a USD value given as a decimal string, ``Decimal`` or int.

        Raises ``TypeError`` for floats (and other types) and ``ValueError`` for text that is not
        a finite decimal, or a value not a whole number of picodollars (more than 12 decimals
        that are not zero), or an absurdly large value.
        """
        if isinstance(amount, str):
            try:
                value = Decimal(amount)
            except ArithmeticError:
                raise ValueError(f"not a decimal USD amount: {amount!r}") from None
        elif isinstance(amount, Decimal):
            value = amount
        elif _is_plain_int(amount):
            value = Decimal(amount)
        else:
            raise TypeError(f"Money.from_usd() takes a str, Decimal or int, not {type(amount).__name__}")
        return cls(_decimal_to_picodollars(value, amount))

    def usd_str(self, min_decimals: int = 6) -> str:
        """The amount in USD as a plain decimal string: at least ``min_decimals`` places, more
        only when needed (up to 12), never an exponent. ``Money(31_744_000_000)`` → ``"0.031744"``.
        """
        sign = "-" if self.picodollars < 0 else ""
        whole, frac = divmod(abs(self.picodollars), PICODOLLARS_PER_USD)
        places = f"{frac:0{_USD_PLACES}d}".rstrip("0").ljust(min_decimals, "0")
        return f"{sign}{whole}.{places}" if places else f"{sign}{whole}"

    def display(self) -> str:
        """The amount as a person reads it: sign first, ``$``, thousands separators, rounded half
        away from zero to 6 decimals (``-$0.000165``, ``$1,250.000000``) — except an amount that
        would round to zero, shown exact (``$0.0000004``): a charge never reads as nothing.
        The dashboard's script applies the same rule; data (API, records, ``--json``) stays exact."""
        micro = PICODOLLARS_PER_USD // 10**6
        magnitude = abs(self.picodollars)
        rounded = (magnitude + micro // 2) // micro * micro
        whole, _, frac = Money(rounded or magnitude).usd_str().partition(".")
        text = f"{int(whole):,}" + (f".{frac}" if frac else "")
        return f"-${text}" if self.picodollars < 0 else f"${text}"

    def __repr__(self) -> str:
        return f"Money.from_usd({self.usd_str()!r})"

    def __str__(self) -> str:
        return f"-${(-self).usd_str()}" if self.picodollars < 0 else f"${self.usd_str()}"

    def __bool__(self) -> bool:
        return self.picodollars != 0

    def __add__(self, other: Money) -> Money:
        if isinstance(other, Money):
            return Money(self.picodollars + other.picodollars)
        if isinstance(other, float):
            raise _refuse("+", other)
        return NotImplemented

    def __radd__(self, other: object) -> Money:
        # Only so that sum() works without a start value; money + a number stays an error.
        if _is_plain_int(other) and other == 0:
            return self
        if isinstance(other, float):
            raise _refuse("+", other)
        return NotImplemented

    def __sub__(self, other: Money) -> Money:
        if isinstance(other, Money):
            return Money(self.picodollars - other.picodollars)
        if isinstance(other, float):
            raise _refuse("-", other)
        return NotImplemented

    def __neg__(self) -> Money:
        return Money(-self.picodollars)

    def __abs__(self) -> Money:
        return Money(abs(self.picodollars))

    def __mul__(self, factor: int) -> Money:
        if _is_plain_int(factor):
            return Money(self.picodollars * factor)
        raise _refuse("*", factor)

    __rmul__ = __mul__


Money.ZERO = Money(0)


def _decimal_to_picodollars(value: Decimal, original: object) -> int:
    if not value.is_finite():
        raise ValueError(f"not a finite USD amount: {original!r}")
    sign, digits, exponent = value.as_tuple()
    coefficient = int("".join(map(str, digits)))
    if coefficient == 0:
        return 0
    if value.adjusted() > _MAX_ADJUSTED_EXPONENT:
        raise ValueError(f"USD amount too large: {original!r}")
    shift = exponent + _USD_PLACES
    if shift >= 0:
        pico = coefficient * 10**shift
    else:
        # Finer than a picodollar: exact only if the extra digits are all zeros.
        if -shift > len(digits):
            raise ValueError(f"USD amount finer than a picodollar (1e-12): {original!r}")
        pico, rest = divmod(coefficient, 10**-shift)
        if rest:
            raise ValueError(f"USD amount finer than a picodollar (1e-12): {original!r}")
    return -pico if sign else pico


def per_minute_cost(rate: Money, seconds: Decimal | int) -> Money:
    """The cost of ``seconds`` of audio at ``rate`` per minute.

    The one rounding rule of meshrt: the exact rational ``rate × seconds / 60`` is rounded half
    up (ties away from zero) to the picodollar. It is applied per billed event, so the error is
    at most 0.5 picodollar per event.

    Raises ``TypeError`` for a float (or other non-Decimal, non-int) ``seconds`` or a non-Money
    rate, ``ValueError`` for negative, non-finite or absurd ``seconds``.
    """
    if not isinstance(rate, Money):
        raise TypeError(f"rate must be Money, not {type(rate).__name__}")
    if _is_plain_int(seconds):
        seconds = Decimal(seconds)
    elif not isinstance(seconds, Decimal):
        raise TypeError(f"seconds must be a Decimal or int, not {type(seconds).__name__}")
    if not seconds.is_finite() or seconds < 0:
        raise ValueError(f"seconds must be finite and >= 0, not {seconds}")
    # Bounds keep Fraction() cheap: 1e12 s is 31 700 years; 1e-60 s is far below any clock.
    if seconds and (seconds.adjusted() > 12 or seconds.as_tuple().exponent < -60):
        raise ValueError(f"seconds out of range: {seconds}")
    exact = Fraction(rate.picodollars) * Fraction(seconds) / 60
    magnitude = abs(exact)
    rounded = int(magnitude + Fraction(1, 2))  # int() floors a non-negative Fraction
    return Money(rounded if exact >= 0 else -rounded)
