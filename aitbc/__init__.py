"""AITBC core library: crypto, receipts, ledger, wallet keystore, config, wire conversion."""

__version__ = "0.1.0"
