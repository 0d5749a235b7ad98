"""meshrt.worker."""
