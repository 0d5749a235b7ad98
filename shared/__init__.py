"""meshrt.shared."""
