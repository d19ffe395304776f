"""bench/RESULTS.md: each benchmark script owns one "## " section and replaces only that one."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (the machine a number was measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.system()}"


def replace_section(heading: str, lines: list[str], path: Path = RESULTS) -> None:
    """Replace the section whose heading line starts with `heading` (up to the next "## " heading) by `lines`, or
    append it; other sections stay as they are. Written atomically (temp file + rename)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}[^\n]*\n.*?(?=^## |\Z)", re.S | re.M)
    section = "\n".join(lines) + "\n"
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
