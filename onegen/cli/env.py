"""`onegen env`: what this installation runs with — package versions, devices, and where a run would go (Ray
address, MLflow store, storage root, work dir), resolved from the config without connecting to anything."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

from onegen.cli import add_config_options, config_from_args
from onegen.config import OnegenConfig

# Distribution names; versions come from package metadata (importing deepspeed alone takes seconds).
PACKAGES = ("onegen", "torch", "ray", "deepspeed", "diffusers", "transformers", "accelerate", "pyarrow", "mlflow",
            "webdataset", "pydantic", "boto3", "numpy")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def detect_devices() -> dict[str, Any]:
    cpus_usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    devices: dict[str, Any] = {"cpu_count": os.cpu_count(), "cpus_usable": cpus_usable,
                               "cuda_available": False, "cuda_devices": [], "cuda_version": None}
    try:
        import torch
    except ImportError:
        return devices
    devices["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        devices["cuda_available"] = True
        devices["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return devices


def collect_env(cfg: OnegenConfig, config_source: str | None = None) -> dict[str, Any]:
    """Everything `onegen env` reports, as JSON-able data."""
    from onegen.raycluster import describe_ray_address
    from onegen.tracking import git_state, tracking_uri

    commit, dirty = git_state()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "devices": detect_devices(),
        "config": config_source or "<built-in defaults>",
        "work_dir": str(cfg.run.work_dir),
        "ray_address": describe_ray_address(cfg),
        "mlflow_tracking_uri": tracking_uri(cfg),
        "storage_root": cfg.storage.root,
        "git_commit": commit,
        "git_dirty": dirty,
    }


def format_env(info: dict[str, Any]) -> str:
    devices = info["devices"]
    gpus = ", ".join(devices["cuda_devices"]) if devices["cuda_devices"] else "none"
    lines = [f"python        {info['python']} ({info['platform']})"]
    lines += [f"{name:<13} {version or 'not installed'}" for name, version in info["packages"].items()]
    lines += [
        f"cpus          {devices['cpus_usable']} usable of {devices['cpu_count']}",
        f"cuda devices  {gpus}" + (f" (CUDA {devices['cuda_version']})" if devices["cuda_version"] else ""),
        f"config        {info['config']}",
        f"work dir      {info['work_dir']}",
        f"ray address   {info['ray_address']}",
        f"mlflow uri    {info['mlflow_tracking_uri']}",
        f"storage root  {info['storage_root']}",
        f"git commit    {info['git_commit']}" + (" (dirty)" if info["git_dirty"] == "true" else ""),
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    info = collect_env(cfg, args.config)
    print(json.dumps(info, indent=2) if args.json else format_env(info))
    return 0
