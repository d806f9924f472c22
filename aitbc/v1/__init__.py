"""Generated from protos/aitbc/v1 by scripts/gen_protos.py. Never edit by hand."""
