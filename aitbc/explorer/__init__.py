"""The explorer: a read-only web app over a ledger node and a coordinator (docs/explorer.md)."""
