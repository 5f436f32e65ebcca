"""Print pip constraints that pin every runtime dependency to its declared floor.

`scripts/test.sh` installs the project with these constraints into a separate venv and runs
the suite there, so a floor in pyproject.toml is a version that was actually tested.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
for requirement in project["project"]["dependencies"]:
    match = re.fullmatch(r"([A-Za-z0-9_.\[\]-]+)>=([0-9][0-9A-Za-z.]*)", requirement.strip())
    if match is None:
        sys.exit(f"floors: cannot read a floor from {requirement!r} (use NAME>=VERSION)")
    name = re.sub(r"\[.*\]", "", match.group(1))
    print(f"{name}=={match.group(2)}")
