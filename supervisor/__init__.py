"""meshrt.supervisor."""
