"""DVC's own command line, with dvc.lock rewritten by libyaml: ``python -m pipelines.dvc_cli repro`` is
``dvc repro`` (`make repro`, `make fanout` and the end-to-end test run DVC this way).

After every stage DVC rewrites the whole dvc.lock through ruamel.yaml's round-trip parser and emitter, in pure
Python, to keep comments that a machine-written lock never has. Our stages list their source files one by one
(so an edit stales only the stages that import it), about 150 lines a stage: the smoke lock is 17,000 lines and
the regression profile's 107,000, so one rewrite takes 4 to 26 s on 2 cores and a repro spends minutes (the
regression profile hours) in them (BENCHMARKS.md, DVC's lock rewrites). Here only dvc.lock's rewrite changes:
the same data, parsed and emitted by ruamel.yaml's C bindings (the library DVC reads the lock with), keys in
DVC's order, a command on one line, written atomically. A stage's text is rendered once: kept from the file
when another process wrote the lock, and a lock this process wrote is not parsed again. dvc.yaml and every
other file DVC writes go through DVC's own code. A plain ``dvc repro`` reads and writes the same lock, slower.
And each YAML text is parsed once per process (``parse_once``), where DVC parses params.yaml again per stage.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pipelines.atomic import write_atomic

LOCK = "dvc.lock"


@functools.cache
def _yaml():
    """One safe YAML instance for every render: the C emitter (ruamel.yaml.clib, pinned in the lock)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import SafeRepresenter

    class Representer(SafeRepresenter):  # DVC's stages are OrderedDicts: plain mappings, as DVC writes them
        pass

    Representer.add_representer(OrderedDict, SafeRepresenter.represent_dict)
    yaml = YAML(typ="safe")
    yaml.Representer = Representer
    yaml.default_flow_style = False
    yaml.sort_base_mapping_type_on_output = False  # DVC's order: a stage's cmd, deps, params, outs
    yaml.width = 2**31 - 1  # no folded lines (the round-trip emitter's folds end in a space)
    return yaml


def render(data: Any) -> str:
    """``data`` as YAML: DVC's key order, block style, each value on one line."""
    out = io.StringIO()
    _yaml().dump(data, out)
    return out.getvalue()


# This process's last write of each lock (its path: its stat, its data) and each stage's text: a repro rewrites
# the lock once per stage, so it parses a lock only when another process wrote it since and renders a stage
# only when its entry changed. DVC replaces a stage's entry in the lock's data, never edits one in place.
_written: dict[str, tuple[tuple[int, int, int], dict]] = {}
_stages: dict[str, tuple[Any, str]] = {}
HEAD = "schema: '2.0'\nstages:\n"
STAGE_KEY = re.compile(r"^  \S", re.M)  # in a block-style lock only the stages' names are indented by two


def load_lock(path: str) -> dict:
    """The lock's data (the C parser); where the file is laid out as a lock is (this module's or DVC's writer),
    each stage's text in it is kept as that stage's rendering, so an unchanged stage is not rendered again."""
    from dvc.utils.serialize import parse_yaml

    text = Path(path).read_text(encoding="utf-8")
    data = parse_yaml(text, path)
    stages, starts = data.get("stages") or {}, [m.start() for m in STAGE_KEY.finditer(text)]
    if list(data) == ["schema", "stages"] and text.startswith(HEAD) and starts[:1] == [len(HEAD)] \
            and len(starts) == len(stages):
        for (name, entry), start, end in zip(stages.items(), starts, starts[1:] + [len(text)]):
            _stages[name] = (entry, text[start:end])
    return data


def render_lock(data: dict) -> str:
    """``render(data)``, from each stage's text rendered once."""
    stages = data.get("stages")
    if list(data) != ["schema", "stages"] or not stages:
        return render(data)
    parts = [render({"schema": data["schema"]}), "stages:\n"]
    for name, entry in stages.items():
        cached = _stages.get(name)
        if cached is None or cached[0] != entry:
            cached = _stages[name] = (copy.deepcopy(entry), render({"stages": {name: entry}})[len("stages:\n"):])
        parts.append(cached[1])
    return "".join(parts)


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size  # a new inode for every atomic write


def install() -> None:
    """Rewrite dvc.lock with the C parser and emitter in this process; every other YAML file as DVC does; and
    parse each text once (``parse_once``)."""
    import dvc.dvcfile

    parse_once()
    round_trip = dvc.dvcfile.modify_yaml

    @contextlib.contextmanager
    def modify_yaml(path, fs=None):
        if os.path.basename(os.fspath(path)) != LOCK or getattr(fs, "protocol", "local") != "local":
            with round_trip(path, fs=fs) as data:
                yield data
            return
        key, exists = os.path.abspath(path), os.path.exists(path)
        last = _written.pop(key, None)  # back only once this write is done
        data = last[1] if exists and last is not None and last[0] == _stat(path) else \
            load_lock(path) if exists else {}
        yield data
        write_atomic(Path(path), render_lock(data))  # rendered first: a failure leaves the old lock whole
        _written[key] = (_stat(path), data)

    dvc.dvcfile.modify_yaml = modify_yaml


def parse_once() -> None:
    """DVC's safe YAML parse, each text parsed once per process and a copy handed out each time: a repro checks
    every stage's params against params.yaml (the smoke profile: 115 parses of the same text) and reads
    dvc.lock twice before it runs anything (BENCHMARKS.md, a no-op repro)."""
    modules = parsing_modules()
    parse = modules[0].parse_yaml  # DVC's own, where the others took theirs from
    parse = getattr(parse, "__wrapped__", parse)  # installed twice (tests): wrap DVC's own once

    @functools.lru_cache(maxsize=8)  # params.yaml, dvc.yaml and the lock's latest texts; an error is not kept
    def parsed(text: str, path: str) -> Any:
        return parse(text, path)

    def parse_yaml(text, path, typ="safe"):
        if typ != "safe" or not isinstance(text, str):
            return parse(text, path, typ)
        return copy.deepcopy(parsed(text, str(path)))

    parse_yaml.__wrapped__ = parse
    for module in modules:
        module.parse_yaml = parse_yaml


def parsing_modules() -> tuple:
    """DVC's modules that hold ``parse_yaml`` under their own name (bound at import), its defining one first."""
    import dvc.utils.serialize
    import dvc.utils.serialize._yaml
    import dvc.utils.strictyaml

    return dvc.utils.serialize._yaml, dvc.utils.serialize, dvc.utils.strictyaml


def main(argv: list[str] | None = None) -> int:
    from dvc.cli import main as dvc_main

    install()
    return dvc_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
