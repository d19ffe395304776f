"""The smallest project job: proves that the cluster, the uploaded working dir and the job runtime env work.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m onegen.jobs.hello

Connects with `init_ray` (inside a job: the job's cluster), runs a few Ray tasks, prints MARKER with their results,
the environment the tasks saw and the cluster resources, and exits 0. Like every project job it takes the project
config (--config/--set) and `init_ray` checks its paths first: a job writes nothing inside its own temporary working
dir, so pass an absolute run.work_dir outside it (`--set run.work_dir=/shared/onegen`); errors exit 2 (config) or 1
(cluster), reported as the `onegen` command does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from onegen.cli import ArgumentParser, add_config_options, config_from_args, run_command
from onegen.errors import UsageError, step
from onegen.raycluster import init_ray

MARKER = "onegen hello: ok"


def _task_view(x: int) -> dict:
    # Runs on a Ray worker: report what the job's runtime env gave it.
    import onegen  # the uploaded working dir (or the install) must be importable on workers

    return {"square": x * x, "git_commit": os.environ.get("ONEGEN_GIT_COMMIT", "unset"),
            "onegen_from": os.path.dirname(os.path.dirname(onegen.__file__))}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m onegen.jobs.hello", description=__doc__.splitlines()[0])
    add_config_options(parser)
    parser.add_argument("--tasks", type=int, default=4, help="Ray tasks to run (>= 1)")
    return run_command("hello", run, parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.tasks < 1:
        raise UsageError(f"--tasks must be >= 1, got {args.tasks}")
    cfg = config_from_args(args)

    ray = init_ray(cfg)
    view = ray.remote(num_cpus=0.5)(_task_view)
    with step("run hello tasks"):
        results = ray.get([view.remote(i) for i in range(args.tasks)], timeout=120)
    squares = [r["square"] for r in results]
    print(f"{MARKER} squares={squares}")
    seen = results[0]
    print(f"onegen hello: task env ONEGEN_GIT_COMMIT={seen['git_commit']} onegen from {seen['onegen_from']}")
    print("onegen hello: cluster resources " + json.dumps(ray.cluster_resources(), sort_keys=True))
    return 0 if squares == [i * i for i in range(args.tasks)] else 1


if __name__ == "__main__":
    sys.exit(main())
