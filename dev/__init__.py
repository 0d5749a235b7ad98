"""Tools beside the role packages: `meshrt dev` (demo) and the one way to wait for a child
process's listening line (children)."""
