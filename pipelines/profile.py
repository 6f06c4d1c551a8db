"""The one rule that switches params.yaml to a profile: `make profile PROFILE=paper` writes it, and the
preflight plans a profile by applying it to a copy (pipelines/preflight/plan.py).

    python -m pipelines.profile paper

A profile sets `profile` and the grids the stages expand with it: the ablations (the paper grid for `paper`,
else the smoke grid), the Table V protocol study and the "Beyond the paper" study (each the smoke grid for
`smoke`, else the regression grid) and Table V's seeds (two for `smoke`, else five).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from pipelines.atomic import write_atomic
from pipelines.config import CONF
from pipelines.errors import ConfigError, print_error


def choices() -> list[str]:
    return sorted(p.stem for p in (CONF / "profile").glob("*.yaml"))


def check(profile: str) -> None:
    if profile not in choices():
        raise ConfigError(f"no profile {profile!r}; choose one of: {' '.join(choices())}")


def switched(params: str, profile: str) -> str:
    """params.yaml's text with ``profile`` selected (and the grids that go with it); comments kept."""
    check(profile)
    lines = {"profile": profile,
             "ablations": f"*{'paper' if profile == 'paper' else 'smoke'}_grid",
             "protocols": f"*{'smoke' if profile == 'smoke' else 'regression'}_protocol",
             "seeds": f"*{'smoke' if profile == 'smoke' else 'table5'}_seeds",
             "beyond": f"*{'smoke' if profile == 'smoke' else 'regression'}_beyond"}
    for key, value in lines.items():
        params, found = re.subn(rf"^{key}: .*$", f"{key}: {value}", params, flags=re.M)
        if found != 1:
            raise ConfigError(f"params.yaml has no top-level line '{key}: ...' to switch")
    return params


def main(argv: list[str]) -> int:
    try:
        if len(argv) != 1:
            raise ConfigError("usage: python -m pipelines.profile <profile>")
        path = Path("params.yaml")
        write_atomic(path, switched(path.read_text(), argv[0]).encode())
        return 0
    except ConfigError as err:
        return print_error("profile", err)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
