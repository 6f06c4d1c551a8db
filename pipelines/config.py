"""The one way an entry point that reads pipelines/conf/ takes its overrides: Hydra's, with errors in one line.

    cfg = compose("train", ["experiment=boston_gal", "seed=0"])   # a ConfigError (one line) if bad
    hydra_main("prepare", "prepare", run)   # `python -m ...`: Hydra's CLI (--cfg job, -m), bad overrides in one line
    cfg = load_file(CONF / "task" / "toy3d.yaml", ["optimizers=[gd]"], Toy3dConf)  # a study's own flat file

Overrides are key=value everywhere (lists as [a,b]); Hydra's also take group=option and +new_key=value. The
studies (toy3d, precision) read one flat file of their own: composed by Hydra its keys would meet conf/'s
groups (their `profile=` would select conf/profile/), so ``load_file`` merges the same key=value items into
it and type-checks them against the study's dataclass.

Checks of a run's values, for the checks the runner makes before any compute (method.check, each Task.check):
``require_number`` (a finite number in an interval) and ``first_nonfinite_setting`` (a config's first NaN or infinity).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from pipelines.errors import ConfigError, print_error

CONF = Path(__file__).resolve().parent / "conf"


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """conf/<config_name>.yaml with ``overrides``; ConfigError in one line for an unknown preset or key, a bad
    value or a bad override."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():  # inside @hydra.main or a test's initialize()
            return hydra_compose(config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_one_line(err)) from None


def load_file(path: Path, overrides: Sequence[str], schema: type) -> Any:
    """The YAML file ``path`` with key=value ``overrides``, as an instance of the dataclass ``schema``;
    ConfigError in one line for a bad key, value or override."""
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"expected key=value overrides, got {bad[0]!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None


def require_number(cfg: DictConfig, key: str, interval: str, optional: bool = False) -> float | None:
    """cfg's number at ``key``, refused in one line unless it is finite and lies in ``interval`` (``"[0, 1)"``:
    a bracket includes its bound, a parenthesis leaves it out; ``inf`` for none), or is null where ``optional``."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return None
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low <= value if interval[0] == "[" else low < value)
          and (value <= high if interval[-1] == "]" else value < high))
    if not ok:
        raise ConfigError(f"{key}={value!r}: use a number in {interval}{' or null' if optional else ''}")
    return value


def first_nonfinite_setting(tree: Any, prefix: str = "") -> tuple[str, float] | None:
    """(key, value) of the first NaN or infinite number in a plain config tree (lists by index), else None."""
    if isinstance(tree, float):
        return None if math.isfinite(tree) else (prefix.rstrip("."), tree)
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        found = first_nonfinite_setting(value, f"{prefix}{key}.")
        if found:
            return found
    return None


def _one_line(err: Exception) -> str:
    """Hydra's and OmegaConf's message without the config search path and OmegaConf's node details."""
    text = str(err).split("Config search path")[0].replace("\t", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(
        ("full_key:", "object_type=", "reference_type="))]
    key = getattr(err, "full_key", None)
    return " ".join(lines) + (f" (key {key})" if key and key not in text.split("full_key:")[0] else "")


def hydra_main(config_name: str, stage: str, run: Callable[[DictConfig], int | None]) -> None:
    """Run ``run(cfg)`` on conf/<config_name>.yaml with the command line's overrides and exit with its code. A
    plain key=value command line is composed once and run directly (a bad override is one line, exit 2): the
    configs make Hydra write nothing, keep the working directory and leave logging alone, so its app wrapper
    would only compose a second time. Hydra's own flags (--cfg, --help, -m, ...) go through ``hydra.main``."""
    argv = sys.argv[1:]
    if not any(arg.startswith("-") for arg in argv):
        try:
            cfg = compose(config_name, argv)
        except ConfigError as err:
            sys.exit(print_error(stage, err))
        sys.exit(run(cfg) or 0)

    import hydra

    @hydra.main(config_path=str(CONF), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> None:
        sys.exit(run(cfg) or 0)

    main()
