"""meshrt.frontdoor: the front door process — HTTP API, upgrade admission and handoff."""
