"""meshrt.storage: the database — tables, accounts and keys, the ledger."""
