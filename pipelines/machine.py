"""What machine a number came from, for a published report's stamp and the benchmarks' output: CPU model and
cores, GPUs, OS, Python and torch versions."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpus": gpus, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
