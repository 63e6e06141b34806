"""Print the project's runtime dependencies pinned at their declared lower bounds (``name==version``).

``make test-oldest`` installs with these as pip constraints, so the suite runs on exactly the oldest
versions pyproject.toml claims to support. A dependency without a ``>=`` lower bound is an error:
every claim of support must be one the suite has run on.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*(?P<version>[0-9][A-Za-z0-9.+-]*)\s*$")


def lower_bounds(pyproject: Path) -> list[str]:
    """``name==version`` for every entry of ``[project].dependencies``; ValueError names one without a bound."""
    pins = []
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = REQUIREMENT.match(requirement)
        if match is None:
            raise ValueError(
                f"{pyproject}: dependency {requirement!r} has no single '>=' lower bound; "
                "declare the oldest version the suite passes on, e.g. 'name>=1.2'"
            )
        pins.append(f"{match['name']}=={match['version']}")
    return pins


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    try:
        print("\n".join(lower_bounds(path)))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
