"""For launch/setup.sh on a CUDA machine: requirements and constraints that keep the installed torch and Triton.

`python launch/cuda_deps.py ROOT PREFIX` writes PREFIX-requirements.txt (the project's dependencies and test extras
without torch and triton) and PREFIX-constraints.txt (launch/constraints.txt without its triton pin, plus
`torch==<installed>` and, when a Triton is installed under any distribution name, `<name>==<installed>`), so pip
never replaces the machine's CUDA torch or the Triton built for it. Standard library only.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

KEEP = {"torch", "triton", "pytorch-triton", "pytorch-triton-rocm"}


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def triton_dist() -> tuple[str, str] | None:
    """(distribution, version) providing the `triton` module, or None."""
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in KEEP - {"torch"}:
            return name, dist.version
    return None


def plan(pyproject: str, constraints: str, torch_version: str, triton: tuple[str, str] | None):
    """(requirements, constraints) lines from the files' text and what is installed."""
    project = tomllib.loads(pyproject)["project"]
    reqs = [r for r in project["dependencies"] + project["optional-dependencies"]["test"] if _name(r) not in KEEP]
    cons = [ln for ln in constraints.splitlines() if ln.strip() and not ln.startswith("#") and _name(ln) not in KEEP]
    cons.append(f"torch=={torch_version}")
    if triton is not None:
        cons.append(f"{triton[0]}=={triton[1]}")
    return reqs, cons


def main(argv: list[str]) -> int:
    root, prefix = Path(argv[0]), argv[1]
    reqs, cons = plan((root / "pyproject.toml").read_text(), (root / "launch" / "constraints.txt").read_text(),
                      md.version("torch"), triton_dist())  # fmt: skip
    Path(f"{prefix}-requirements.txt").write_text("\n".join(reqs) + "\n")
    Path(f"{prefix}-constraints.txt").write_text("\n".join(cons) + "\n")
    print("setup: keeping " + ", ".join(c for c in cons if _name(c) in KEEP))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
