#!/usr/bin/env python3
"""Regenerate aitbc/v1/*_pb2*.py(i) from protos/aitbc/v1/*.proto (the one generation command)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "aitbc" / "v1"


def main() -> int:
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos" / "aitbc" / "v1").glob("*.proto"))
    for old in OUT.glob("*_pb2*.py*"):
        old.unlink()
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    if shutil.which("protoc-gen-mypy", path=env["PATH"]) is None:
        print("protoc-gen-mypy not found: pip install -e '.[dev]'", file=sys.stderr)
        return 1
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", "-Iprotos",
        f"--python_out={ROOT}", f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}", f"--mypy_grpc_out={ROOT}", *protos,
    ]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    init = OUT / "__init__.py"
    init.write_text('"""Generated from protos/aitbc/v1 by scripts/gen_protos.py. Never edit by hand."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
