"""What every CPU benchmark sets before numpy, torch or Ray are imported; import it first.

The scripts run as `python bench/NAME.py`, so this folder is on sys.path and this module imports by its plain name;
it then puts the repository on sys.path for `bench.*`, `pipelines.*`, `onegen.*`. One thread per BLAS / OpenMP pool
(PIN_ENV, also handed to Ray workers: every side of a comparison is pinned alike), Ray without auth or usage stats.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PIN_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
for _name, _value in PIN_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
