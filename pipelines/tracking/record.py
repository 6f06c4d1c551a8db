"""The run record's format: its files, how a config becomes MLflow params, what counts as a finite metric.

    params = to_params(plain_container(cfg))         # [("model.lr", "0.01"), ...]: MLflow params
    first_nonfinite({"loss": float("nan")})          # ("loss", nan): a diverged row, else None
    write(tmp, config=..., step_name="epoch", columns=[...], history=[...], final={...}, meta={...})

RECORD_FILES are the files every record holds (also its MLflow artifacts under RECORD_DIR); a dirty tree's
record adds DIFF_FILE and UNTRACKED_FILE (also under PROVENANCE_DIR). Their contents: pipelines/CONTRACT.md
(Run records). Imports nothing heavy: the report reads records with RECORD_FILES.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import numbers
import posixpath
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.errors import TrackingError

RECORD_FILES = ("config.yaml", "history.csv", "metrics.json", "run.json")  # a run record, also MLflow artifacts
RECORD_DIR = "record"  # ... under this artifact directory
DIFF_FILE, UNTRACKED_FILE = "git_diff.patch", "git_untracked.txt"  # a dirty run's record (and MLflow artifacts)
PROVENANCE_DIR = "provenance"  # the MLflow artifact directory they go to
PARAM_VALUE_MAX = 500  # MLflow's historic limit for a param value (newer servers allow more; old ones don't)
KEY_MAX = 250  # MLflow's limit for a param/tag/metric key
# Characters MLflow accepts in param, tag and metric names; anything else in a key becomes "_".
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


# --------------------------------------------------------------------------------------------- config
def plain_container(config: Any) -> dict:
    """A DictConfig (resolved) or mapping as plain dicts and lists (what config.yaml and the digest see)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    return OmegaConf.to_container(OmegaConf.create(dict(config)), resolve=True)


def dotted(config: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested mappings as {"a.b.c": str(value)}; lists of scalars stay one value, lists holding
    mappings are flattened by index; empty mappings become "{}"."""
    flat: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(dotted(v, key + ".") if v else {key: "{}"})
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (Mapping, list, tuple)) for x in v):
            flat.update(dotted({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            flat[key] = str(v)
    return flat


def mlflow_key(name: str) -> str:
    """A name MLflow accepts: allowed characters only, and no path that normalises to another name."""
    key = posixpath.normpath(_BAD_KEY_CHARS.sub("_", str(name))).lstrip("/")
    if key.startswith("..") or key in ("", "."):
        key = "_" + key[1:]
    if len(key) > KEY_MAX:  # keep it unique: cut and add a short hash of the full name
        key = key[:KEY_MAX - 9] + "~" + hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()[:8]
    return key


def to_params(config: Mapping) -> list[tuple[str, str]]:
    """The config as MLflow params (name, value): ``dotted`` names made ``mlflow_key``s, values cut to
    PARAM_VALUE_MAX characters (config.yaml has them whole)."""
    return [(mlflow_key(k), _param_value(v)) for k, v in dotted(config).items()]


def _param_value(value: str) -> str:
    return value if len(value) <= PARAM_VALUE_MAX else value[:PARAM_VALUE_MAX - 3] + "..."


# -------------------------------------------------------------------------------------------- metrics
def first_nonfinite(metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    """(name, value) of the first metric that is a number but NaN or +-inf (a diverged run), else None."""
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue  # not a number at all: log_epoch refuses it
        if not math.isfinite(number):
            return str(name), number
    return None


def finite_metrics(metrics: Mapping[str, float], where: str) -> dict[str, float]:
    """The metrics as floats; TrackingError (saying ``where``) for one that is not a number or not finite."""
    out = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TrackingError(f"metric {name!r} {where} is not a number ({value!r}); log floats only") from None
        if not math.isfinite(number):
            raise TrackingError(f"metric {name!r} is {number} {where}: the run diverged; "
                                "lower the learning rate or check the data")
        out[str(name)] = number
    return out


def csv_cell(raw: Any, number: float) -> str:
    """A history.csv cell: integers (flags, counts) as integers, everything else as a round-tripping float."""
    if isinstance(raw, numbers.Integral):
        return str(int(raw))
    dtype = getattr(raw, "dtype", None)  # numpy scalars (dtype.kind) and torch tensors (dtype.is_floating_point)
    if dtype is not None and (dtype.kind in "biu" if hasattr(dtype, "kind") else
                              not (dtype.is_floating_point or dtype.is_complex)):
        return str(int(raw))
    return repr(number)


# -------------------------------------------------------------------------------------------- writing
def write(directory: Path, *, config: Mapping, step_name: str, columns: Sequence[str],
          history: Sequence[tuple[int, Mapping[str, str]]], final: Mapping[str, float], meta: Mapping,
          diff: bytes | None) -> None:
    """A whole record into ``directory``: RECORD_FILES (``meta`` is run.json), and with a ``diff`` (a dirty
    tree) the git changes as well."""
    from omegaconf import OmegaConf

    (directory / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(dict(config))))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = list(columns)
    writer.writerow([step_name, *columns])
    for step, values in history:
        writer.writerow([step, *(values.get(c, "") for c in columns)])
    (directory / "history.csv").write_text(buf.getvalue())
    (directory / "metrics.json").write_text(json.dumps(dict(final), indent=2) + "\n")
    (directory / "run.json").write_text(json.dumps(dict(meta), indent=2) + "\n")
    if diff is not None:
        write_git_changes(directory, diff, meta["git_untracked"])


def write_git_changes(directory: Path, diff: bytes, untracked: Sequence[str]) -> None:
    """A dirty tree's diff and untracked files (run record and MLflow artifacts)."""
    (directory / DIFF_FILE).write_bytes(diff)
    (directory / UNTRACKED_FILE).write_text("".join(f"{path}\n" for path in untracked))
