"""Run identity: ``<setting>-<method>[-<variant>]-s<seed>``, the one name of a run's record directory,
checkpoint directory and MLflow run.

The setting is ``cfg.experiment`` (the paper's recipe, e.g. ``cifar100_sgd``, or the regression set,
e.g. ``boston``). The variant names every way the config differs from the preset's own config
(``experiment=<setting>_<method>`` at the same profile and seed): the preset is composed again and the
two resolved configs are compared key by key, so an override is named however it was spelled
(``method.ratio=0.001``, ``method=...``, a group choice). ``trainer.*`` (where and on how many processes a
run goes) and ``root`` never make a variant, but for ``trainer.precision``, which changes the numbers
(``precision-bf16``); anything else does, so two configs that differ in anything but those never share a
name. Tokens are short and stable (sorted by key): ``eps0.001``, ``scale5``,
``policy-always``, ``src-uniform`` (h's settings, null for noise, are not named), ``norm-false``,
``dtype-float64``, ``cnn-256,64`` (lists as Hydra writes them, so a DVC stage spells the name and the override from one
value), ``epochs1``; a long variant keeps a readable head and a hash of the whole.

Every key of a run's config acts or is refused: one the preset does not have (added with ``+`` or ``++``, say
``+task.epochz=3``) is refused in one line naming it (``check_keys``), so no name holds a key that did nothing.
"""
from __future__ import annotations

import difflib
import hashlib
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipelines.config import CONF, compose
from pipelines.errors import ConfigError
from pipelines.training.method import NETWORK_KEYS

SEEDS = 2**32  # seeds are 0 .. 2**32 - 1: numpy's legacy seeding takes no more (seeding.py folds larger ones onto
# its 32 bits, so two seeds would share its stream), and torch's 64 bits leave room for seed + epoch
# Keys a run may hold beyond its preset's: method.* and optim.* are refused by method.check unless GAL has the
# setting or the optimiser takes the argument; model.bn_momentum is read where set (EfficientNets take it).
OPEN = ("method.", "optim.")
OPTIONAL = ("model.bn_momentum",)
NOT_IDENTITY = ("trainer", "root", "seed")  # top-level keys that never make a variant (seed is in the name)
VARIANT_MAX = 72
# Short names of GAL's hyper-parameters (the paper's symbols where it has them); a study is named by its value
# alone (``study=beyond``: ``beyond``).
TOKENS = {"study": "", "method.ratio": "eps", "method.scale": "scale", "method.policy": "policy-",
          "method.source": "src-", "method.proposal": "prop-", "method.remainder": "rem-", "method.adjuster_lr": "hlr",
          "method.activation": "act-", "method.bias": "bias-", "method.normalize": "norm-",
          "method.compute_dtype": "dtype-"}


def preset_overrides(cfg: DictConfig) -> list[str]:
    """The overrides that compose the preset this run is a variant of."""
    if not cfg.get("experiment"):
        raise ConfigError("no experiment: every run starts from a preset, experiment=<setting>_<method> "
                          "(conf/experiment/, e.g. experiment=boston_gal or cifar100_sgd_gal)")
    if isinstance(cfg.get("seed"), int) and not 0 <= cfg.seed < SEEDS:
        raise ConfigError(f"seed={cfg.seed}: use an integer from 0 to {SEEDS - 1}")
    return [f"experiment={cfg.experiment}_{cfg.method.name}", f"profile={cfg.profile}", f"seed={cfg.seed}"]


def compose_preset(cfg: DictConfig) -> DictConfig:
    overrides = preset_overrides(cfg)
    try:
        return compose("train", overrides)
    except ConfigError as err:
        raise ConfigError(f"no preset {overrides[0]} to name this run after ({err}); runs are named after "
                          f"conf/experiment/<setting>_<method>.yaml") from None


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _paths(tree: Any, prefix: str = "") -> set[str]:
    """Every key of a plain config tree, parents included."""
    found: set[str] = set()
    for key, value in (tree.items() if isinstance(tree, dict) else ()):
        found |= {f"{prefix}{key}", *_paths(value, f"{prefix}{key}.")}
    return found


def check_keys(cfg: DictConfig, preset: DictConfig) -> None:
    """Refuse a key of ``cfg`` that its preset does not have: added with + or ++, nothing reads it. Beyond the
    preset's keys a run may hold those of the data set it chose (data=...), OPTIONAL ones and, under their own
    rule, OPEN ones."""
    known = _paths(OmegaConf.to_container(preset))
    data_file = CONF / "data" / f"{cfg.data.get('name')}.yaml"
    if data_file.is_file():  # data=<another set> brings that set's own keys
        known |= _paths({"data": OmegaConf.to_container(OmegaConf.load(data_file))})
    for key in sorted(_leaves(OmegaConf.to_container(cfg))):
        if key not in known and key not in OPTIONAL and not key.startswith(OPEN):
            close = difflib.get_close_matches(key, sorted(known | set(OPTIONAL)), n=1)
            hint = f"did you mean {close[0]}?" if close else "remove it"
            raise ConfigError(f"{key}: experiment={preset.experiment}_{preset.method.name} has no such setting, "
                              f"so nothing would read it; {hint}")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, ".12g")
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value) or "none"  # as Hydra's list syntax writes it: [256,64]
    return re.sub(r"[^A-Za-z0-9.+_]", "_", str(value))


def _short_key(key: str, keys: set[str]) -> str:
    """The shortest dotted suffix of ``key`` that no other key ends with."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[i:])
        if not any(k != key and (k == suffix or k.endswith("." + suffix)) for k in keys):
            return suffix.replace(".", "_")
    return key.replace(".", "_")


def variant(cfg: DictConfig, preset: DictConfig | None = None) -> str:
    """"" for the preset's own config, else the short name of every difference from it."""
    preset = compose_preset(cfg) if preset is None else preset
    check_keys(cfg, preset)
    ours, theirs = (_leaves({**{k: v for k, v in OmegaConf.to_container(c, resolve=True).items()
                                if k not in NOT_IDENTITY}, "trainer": {"precision": str(c.trainer.precision)}})
                    for c in (cfg, preset))
    keys = set(ours) | set(theirs)
    changed = sorted(k for k in keys if ours.get(k, KeyError) != theirs.get(k, KeyError))
    if ours.get("method.source", "learned") != "learned":  # noise: h's settings are null by rule, not choice
        changed = [k for k in changed if k.removeprefix("method.") not in NETWORK_KEYS]
    tokens = []
    if any(k in ("method.kind", "method.arch") for k in changed):  # the adjuster's architecture, as one token
        tokens.append(f"{ours.get('method.kind', 'mlp')}-{_text(ours.get('method.arch', []))}")
    for key in changed:
        if key in ("method.kind", "method.arch"):
            continue
        if key not in ours:
            tokens.append(f"no-{_short_key(key, keys)}")
            continue
        value = _text(ours[key])
        name = TOKENS[key] if key in TOKENS else _short_key(key, keys)
        number = isinstance(ours[key], (int, float)) and not isinstance(ours[key], bool)
        tokens.append(f"{name}{'' if number or not name or name.endswith('-') else '-'}{value}")
    name = "-".join(tokens)
    if len(name) > VARIANT_MAX:  # keep it a path component: a readable head and a hash of the whole
        name = name[:VARIANT_MAX - 9].rstrip("-") + "~" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name


def run_name(cfg: DictConfig, variant_name: str) -> str:
    parts = [str(cfg.experiment), str(cfg.method.name), *([variant_name] if variant_name else []), f"s{cfg.seed}"]
    return "-".join(parts)
