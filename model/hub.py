"""Where pretrained weights come from: a local folder, or a Hugging Face hub repo id downloaded into the HF cache.

One place for that decision, so every loader (NextDiT, the pipeline) reports a failed download the same way: naming
the repo id and the fix (a local copy of the folder), instead of a bare connection error.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def resolve_pretrained_folder(name_or_path: str | Path, *, allow_patterns: list[str] | None = None,
                              **hub_kwargs) -> Path:
    """The local folder behind `name_or_path`: the path itself if it exists, else a snapshot of the hub repo.

    hub_kwargs (revision, cache_dir, token, local_files_only) go to huggingface_hub.snapshot_download."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; expected a model folder")
        return path
    if not HUB_REPO_ID.fullmatch(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path} is neither a local folder nor a hub repo id 'owner/name'")
    if path.parent.is_dir() and str(path.parent) not in ("", "."):
        # 'work/pipelin' looks like a repo id too, but 'work/' is a local folder: a typo, not a download
        raise FileNotFoundError(f"{name_or_path}: no such folder (in {path.parent}: "
                                f"{sorted(p.name for p in path.parent.iterdir())[:10]})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns, **hub_kwargs))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(
            f"could not get '{name_or_path}' from the Hugging Face hub and it is not in the local cache "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). Download the folder on a machine with access "
            "(e.g. `huggingface-cli download` or `git clone` of the repo) and pass its local path instead."
        ) from err
