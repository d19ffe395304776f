"""`onegen build inspect ROOT_OR_BUILD`: a build's manifest summary and a contact sheet of what the trainer will see.

The contact sheet decodes every view of random rows back from their latents (posterior means) with the tokenizer
recorded in the row, so it shows the training data as the trainer reads it, not the source pictures.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from onegen.dataset import Build, open_build
from onegen.storage import Storage

LABEL_HEIGHT = 12


def summarise(build: Build) -> dict[str, Any]:
    entries = build.entries()
    try:
        manifest = build.manifest()
    except FileNotFoundError:
        manifest = None
    counts: Counter = Counter()
    dropped: Counter = Counter()
    for entry in entries.values():
        dropped.update(entry["dropped"])
        for item in entry["counts"]:
            counts[(item["resolution"], tuple(item["bucket"]), item["views"], ",".join(item["modalities"]),
                    item["split"])] += item["rows"]
    return {"build": build.name, "uri": build.uri, "complete": manifest is not None,
            "shards": len(entries), "samples": sum(e["samples"] for e in entries.values()),
            "rows": sum(e["rows"] for e in entries.values()), "inputs": sum(e["inputs"] for e in entries.values()),
            "dropped": dict(sorted(dropped.items())),
            "duplicates": len(manifest["duplicates"]) if manifest else None,
            "counts": [{"resolution": k[0], "bucket": list(k[1]), "views": k[2], "modalities": k[3], "split": k[4],
                        "rows": n} for k, n in sorted(counts.items())]}


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"build {summary['build']} at {summary['uri']} ({'complete' if summary['complete'] else 'INCOMPLETE'})",
             f"  {summary['shards']} shards, {summary['inputs']} inputs, {summary['samples']} samples, "
             f"{summary['rows']} rows, exact duplicates: {summary['duplicates']}",
             "  resolution  bucket     views  split    rows  modalities"]
    for c in summary["counts"]:
        lines.append(f"  {c['resolution']:<10}  {c['bucket'][0]}x{c['bucket'][1]:<6} {c['views']:<5}  "
                     f"{c['split']:<7} {c['rows']:>5}  {c['modalities']}")
    if summary["dropped"]:
        lines.append("  dropped: " + ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()))
    return "\n".join(lines)


def sample_rows(build: Build, count: int, seed: int) -> list[dict[str, Any]]:
    """`count` random latent rows of the committed shards (reproducible for a seed)."""
    rows = list(build.rows(skip_duplicates=False, as_tensors=False))
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(rows), size=min(count, len(rows)), replace=False) if rows else []
    return [rows[i] for i in sorted(picked)]


def contact_sheet(rows: list[dict[str, Any]], cell: int = 128) -> Image.Image:
    """One line per row: every (view, modality) decoded from its latent mean, labelled."""
    import torch

    from model.tokenizers import PixelTokenizer, load_image_tokenizer

    tokenizers: dict[str, Any] = {}
    lines = []
    for row in rows:
        spec = row["image_tokenizer"]
        if spec not in tokenizers:
            tokenizers[spec] = PixelTokenizer() if spec == "pixel" else load_image_tokenizer(spec)
        tokenizer = tokenizers[spec]
        cells = []
        for (view, modality), (mean, _) in row["latents"].items():
            with torch.no_grad():
                pixels = tokenizer.decode(torch.from_numpy(mean)[None])[0]
            picture = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            cells.append((f"v{view} {modality}", _fit(picture, cell)))
        lines.append((f"{row['id']} {row['bucket_h']}x{row['bucket_w']}", cells))
    columns = max((len(cells) for _, cells in lines), default=1)
    sheet = Image.new("RGB", (columns * (cell + 2), max(1, len(lines)) * (cell + 2 * LABEL_HEIGHT + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, cells) in enumerate(lines):
        top = r * (cell + 2 * LABEL_HEIGHT + 2)
        draw.text((2, top), title, fill="black")
        for c, (label, picture) in enumerate(cells):
            sheet.paste(Image.fromarray(picture), (c * (cell + 2), top + LABEL_HEIGHT))
            draw.text((c * (cell + 2) + 2, top + LABEL_HEIGHT + cell), label, fill="black")
    return sheet


def _fit(picture: np.ndarray, cell: int) -> np.ndarray:
    image = Image.fromarray(picture)
    image.thumbnail((cell, cell))
    canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
    canvas.paste(image, ((cell - image.width) // 2, (cell - image.height) // 2))
    return np.asarray(canvas)


def inspect_build(target: str, out: str | None = None, samples: int = 8, seed: int = 0
                  ) -> tuple[dict[str, Any], str | None]:
    """(summary, contact sheet path or None when the build has no rows); `out` defaults to NAME_contact_sheet.png."""
    build = open_build(target)
    summary = summarise(build)
    out = out or f"{build.name}_contact_sheet.png"
    path = None
    if summary["rows"]:
        sheet = contact_sheet(sample_rows(build, samples, seed))
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        storage, name = Storage.for_file(out)
        storage.write_bytes(name, buffer.getvalue())
        path = out
    return summary, path


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=1, sort_keys=True)
