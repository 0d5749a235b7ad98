"""Glue between a session's grant and the meter: builds what the relay calls per frame."""

from __future__ import annotations


def build_meter(grant):
    """Return (meter, may_carry_usage) for the relay; (None, None) while metering is off."""
    return None, None
