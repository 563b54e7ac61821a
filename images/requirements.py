"""Print the requirements of the given extras of pyproject.toml (core dependencies with
``core``), one per line, with ``patchgap[...]`` self-references expanded.

The images install dependencies from this list before the source is copied, so a code edit
rebuilds only the last layer. Run beside pyproject.toml: python requirements.py core kfp
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]


def expand(name: str) -> list[str]:
    reqs = project["dependencies"] if name == "core" else extras[name]
    out = []
    for req in reqs:
        own = re.fullmatch(r"patchgap\[([\w,-]+)\]", req)
        out += [r for n in own.group(1).split(",") for r in expand(n)] if own else [req]
    return out


print("\n".join(dict.fromkeys(r for name in sys.argv[1:] for r in expand(name))))
