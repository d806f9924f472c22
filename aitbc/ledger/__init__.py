"""Ledger: PoA chain state machine, LMDB store, consensus, mempool."""
