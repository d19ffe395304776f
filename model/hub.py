"""Where pretrained weights come from: a local folder, or a Hugging Face hub repo id downloaded into the HF cache.

One place for that decision, so every loader (NextDiT, the pipeline) reports a failed download the same way: naming
the repo id and the fix (a local copy of the folder), instead of a bare connection error. `named_load_errors` does the
same for files that are there but cannot be read (a truncated safetensors file, a config.json that is not JSON).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def named_load_errors(path: str | Path, what: str) -> Iterator[None]:
    """Re-raise what a loader raises on an unreadable file (safetensors' SafetensorError, a JSON error, PyTorch's and
    the hub libraries' OSError / RuntimeError) as a ValueError naming `path`, `what` it is and the fix: the bare
    errors ("incomplete metadata, file not fully covered") name no file. A missing file stays FileNotFoundError."""
    from safetensors import SafetensorError

    try:
        yield
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: cannot load {what} ({type(err).__name__}: {first_line}); the file is corrupt or "
                         "cut short: download or save it again.") from err


def read_json_file(path: str | Path, what: str) -> Any:
    """The parsed JSON of `path`, or a ValueError naming it (see `named_load_errors`)."""
    with named_load_errors(path, what):
        return json.loads(Path(path).read_text(encoding="utf-8"))
