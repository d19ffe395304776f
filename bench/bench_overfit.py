"""CPU time of the overfitting test's workload (tests/test_overfit.py), measured here rather than asserted there.

    .venv/bin/python bench/bench_overfit.py                  # print only
    .venv/bin/python bench/bench_overfit.py --write-results  # also rewrite "## Overfit (CPU)" in RESULTS.md

Runs the test's own `memorise_and_sample` (nextdit-tiny memorises 4 latents in 1000 flow-matching steps, then samples
them twice with 20 Euler steps) for text -> image and image -> depth, on one thread as the test does, and reports the
CPU seconds of this process for each (training + the two samplings; process time, so other load on a shared machine
inflates it less than wall time), the loss drop and the sample errors the test checks. The budget the test used to
assert, "loss falls >= 10x in under a minute of CPU time", is reported as met or missed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch creates its pools

import argparse  # noqa: E402
import datetime  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the workload is the test's, so the number stays about that test

import torch  # noqa: E402
from test_overfit import (  # noqa: E402
    MAX_RELATIVE_ERROR,
    SAMPLE_STEPS,
    SAMPLING_SCHEDULE,
    TRAIN_STEPS,
    loss_drop,
    memorise_and_sample,
    relative_errors,
)

from bench.results_file import RESULTS, cpu_name, replace_section  # noqa: E402
from model.flow import FlowConfig  # noqa: E402

SECTION = "## Overfit (CPU)"
CPU_SECONDS_BUDGET = 60.0
_SAMPLED = dict(sampling_schedule=SAMPLING_SCHEDULE, condition_steps=SAMPLE_STEPS)
TASKS = {  # name -> (views, target mask, flow config), as in the two tests
    "text -> image": (1, torch.tensor([True]), FlowConfig(text_dropout_prob=0.0, **_SAMPLED)),
    "image -> depth": (2, torch.tensor([False, True]),
                       FlowConfig(text_dropout_prob=0.0, clean_condition_prob=0.5, **_SAMPLED)),
}


def measure(views: int, target: torch.Tensor, cfg: FlowConfig) -> dict:
    start = time.process_time()
    latents, losses, sampled = memorise_and_sample(views, target, cfg)
    cpu_seconds = time.process_time() - start
    errors = relative_errors(sampled[:, target], latents[:, target])
    return {"cpu_seconds": cpu_seconds, "loss_first20": sum(losses[:20]) / 20, "loss_last20": sum(losses[-20:]) / 20,
            "loss_drop": loss_drop(losses), "max_relative_error": errors.max().item()}


def section(results: dict[str, dict], load: float) -> list[str]:
    lines = [SECTION, "",
             f"`.venv/bin/python bench/bench_overfit.py --write-results` — {cpu_name()}, 1 thread, torch "
             f"{torch.__version__}, {datetime.date.today()}; 1-min load average {load:.2f} on {os.cpu_count()} cores. "
             f"The workload of tests/test_overfit.py: nextdit-tiny memorises 4 latents in {TRAIN_STEPS} steps, then "
             "samples them twice (20 Euler steps); CPU seconds of this process for the whole call.", "",
             "| task | CPU s | loss first 20 -> last 20 | drop | max sample rel. error |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | **{r['cpu_seconds']:.1f}** | {r['loss_first20']:.3f} -> {r['loss_last20']:.4f} | "
                     f"{r['loss_drop']:.0f}x | {r['max_relative_error']:.3f} |")
    met = all(r["cpu_seconds"] < CPU_SECONDS_BUDGET and r["loss_drop"] >= 10 for r in results.values())
    lines += ["", f"Budget (loss falls >= 10x in under {CPU_SECONDS_BUDGET:.0f} s of CPU time, per task): "
              f"{'met' if met else 'MISSED'}; the test asserts the drop and errors < {MAX_RELATIVE_ERROR}, not time.",
              ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-results", action="store_true", help=f"replace '{SECTION}' in {RESULTS.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for name, (views, target, cfg) in TASKS.items():
        results[name] = measure(views, target, cfg)
        print(f"{name}: {results[name]['cpu_seconds']:.1f} CPU s, loss drop {results[name]['loss_drop']:.0f}x, "
              f"max relative error {results[name]['max_relative_error']:.3f}", flush=True)
    lines = section(results, os.getloadavg()[0])
    print("\n".join(lines))
    if args.write_results:
        replace_section(SECTION, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
