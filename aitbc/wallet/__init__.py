"""Wallet keystore (Argon2id + XChaCha20-Poly1305)."""
