"""`onegen build inspect ROOT_OR_BUILD`: a build's manifest summary and a contact sheet of what the trainer will see.

The summary comes from the manifest alone (committed entries, the plan, the final manifest): samples, rows per
resolution / bucket / view count / modalities / split, inputs kept and dropped by reason, and whether the build is
final. The contact sheet decodes every view of random rows back from their latents (posterior means) with the
tokenizer recorded in the row, and writes beside them the prompts the trainer builds for the tasks the row feeds
(model/tasks.py's builders), so it shows the training data as the trainer reads it, not the source pictures.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from onegen.dataset import Build, open_build, prompt_kwargs
from onegen.shards import plan_path
from onegen.storage import Storage
from pipelines.shard_writer import add_label_counts

LINE = 11  # pixels per text line of PIL's default font
PROMPT_PANEL = 460  # width of the prompt text beside each row's pictures
CAPTION_LINES = 3


@dataclass
class Inspection:
    summary: dict[str, Any]
    sheet: str | None = None  # where the contact sheet was written (None: no rows, or none asked for)
    rows: int = 0  # rows on the sheet
    cells: list[dict[str, Any]] = field(default_factory=list)  # per picture: id, resolution, view, modality, box
    warnings: list[str] = field(default_factory=list)


def summarise(build: Build) -> dict[str, Any]:
    entries = build.entries()
    try:
        manifest = build.manifest()
    except FileNotFoundError:
        manifest = None
    counts: Counter = Counter()
    dropped: Counter = Counter()
    left_out: Counter = Counter()
    splits: Counter = Counter()
    modalities: Counter = Counter()
    for entry in entries.values():
        dropped.update(entry["dropped"])
        left_out.update(entry.get("left_out", {}))
        for item in entry["counts"]:
            counts[(item["resolution"], tuple(item["bucket"]), item["views"], ",".join(item["modalities"]),
                    item["split"])] += item["rows"]
            splits[item["split"]] += item["rows"]
            modalities.update({m: item["rows"] for m in item["modalities"]})
    labels: dict[str, Counter] = {}
    for entry in entries.values():
        add_label_counts(labels, entry)
    planned = None
    if build.storage.exists(plan_path(build.name)):
        planned = len(json.loads(build.storage.read_bytes(plan_path(build.name)))["partitions"])
    inputs = sum(e["inputs"] for e in entries.values())
    return {"build": build.name, "uri": build.uri, "complete": manifest is not None,
            "shards": len(entries), "planned_shards": planned, "samples": sum(e["samples"] for e in entries.values()),
            "rows": sum(e["rows"] for e in entries.values()), "inputs": inputs,
            "kept": inputs - sum(dropped.values()), "dropped": dict(sorted(dropped.items())),
            "left_out": dict(sorted(left_out.items())),
            "duplicates": len(manifest["duplicates"]) if manifest else None,
            "splits": dict(sorted(splits.items())), "modalities": dict(sorted(modalities.items())),
            "labels": {stage: dict(sorted(c.items())) for stage, c in sorted(labels.items())},
            "counts": [{"resolution": k[0], "bucket": list(k[1]), "views": k[2], "modalities": k[3], "split": k[4],
                        "rows": n} for k, n in sorted(counts.items())]}


def state_line(summary: dict[str, Any]) -> str:
    """One line: is the build final (what the trainer needs) and, if not, how far it got and what to do."""
    if summary["complete"]:
        return f"build {summary['build']} at {summary['uri']}: final (manifest/_final.json)"
    planned = "?" if summary["planned_shards"] is None else summary["planned_shards"]
    return (f"build {summary['build']} at {summary['uri']}: NOT FINAL, {summary['shards']} of {planned} planned "
            "shards committed; the trainer refuses it until the same `onegen build --config ...` is rerun to finish "
            "it")


def format_summary(summary: dict[str, Any]) -> str:
    dropped = sum(summary["dropped"].values())
    lines = [state_line(summary),
             f"  {summary['shards']} shards; {summary['inputs']} inputs: kept {summary['kept']}, dropped {dropped}; "
             f"{summary['samples']} samples, {summary['rows']} rows, exact duplicates: "
             f"{'n/a until final' if summary['duplicates'] is None else summary['duplicates']}",
             "  splits (rows): " + (", ".join(f"{k} {v}" for k, v in summary["splits"].items()) or "none"),
             "  modalities (rows): " + (", ".join(f"{k} {v}" for k, v in summary["modalities"].items()) or "none"),
             "  resolution  bucket     views  split    rows  modalities"]
    for c in summary["counts"]:
        lines.append(f"  {c['resolution']:<10}  {c['bucket'][0]}x{c['bucket'][1]:<6} {c['views']:<5}  "
                     f"{c['split']:<7} {c['rows']:>5}  {c['modalities']}")
    if summary["dropped"]:
        lines.append("  dropped by reason: " + ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()))
    if summary.get("left_out"):
        lines.append("  pictures left out of their groups: " +
                     ", ".join(f"{k} {v}" for k, v in summary["left_out"].items()))
    for stage, counts in summary.get("labels", {}).items():  # a labeller's failures keep the sample: counted here
        lines.append(f"  {stage} labels (samples): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return "\n".join(lines)


def sample_rows(build: Build, count: int, seed: int) -> list[dict[str, Any]]:
    """`count` random latent rows of the build's shards (reproducible for a seed), in build order. Rows are picked
    by index from the manifest's row counts, so only the shards holding them are read."""
    shards = build.shards()
    sizes = np.array([build.entries()[shard]["rows"] for shard in shards], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    picked = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total), replace=False))
    rows = []
    for index in picked.tolist():
        k = int(np.searchsorted(starts, index, side="right")) - 1
        rows.append(build.row(shards[k], index - int(starts[k]), as_tensors=False))
    return rows


# --- decoding ------------------------------------------------------------------------------------------------------

class Tokenizers:
    """The image tokenizers the rows name, each loaded once; a tokenizer whose config differs from the one the
    build recorded gives a warning (its pictures are not what the trainer's latents hold)."""

    def __init__(self):
        self.loaded: dict[str, Any] = {}
        self.warnings: list[str] = []

    def get(self, spec: str, recorded_sha: str | None):
        if spec not in self.loaded:
            self.loaded[spec] = self._load(spec, recorded_sha)
        return self.loaded[spec]

    def _load(self, spec: str, recorded_sha: str | None):
        from pathlib import Path

        from model.tokenizers import PixelTokenizer, load_image_tokenizer
        from pipelines.process import tokenizer_identity

        if spec == "pixel":
            return PixelTokenizer()
        source, revision = spec, None
        if not Path(spec).exists() and "@" in spec:  # a hub id recorded with the commit it was built at
            source, revision = spec.rsplit("@", 1)
        try:
            tokenizer = load_image_tokenizer(source, revision=revision)
            _, sha = tokenizer_identity(source, revision)
        except (OSError, ValueError, ImportError) as err:
            from onegen.errors import UsageError, first_line

            raise UsageError(f"the rows were encoded by image tokenizer {spec!r}, which cannot be loaded here "
                             f"({first_line(err)}); make that folder or hub id (at that commit) reachable to "
                             "decode the contact sheet") from None
        if recorded_sha and sha and sha != recorded_sha:
            self.warnings.append(f"warning: image tokenizer {spec!r} has another config (sha256 {sha[:12]}) than "
                                 f"the build recorded ({recorded_sha[:12]}): the sheet may not show what was encoded")
        return tokenizer


def decode_views(row: dict[str, Any], tokenizer) -> dict[tuple[int, str], np.ndarray]:
    """{(view, modality): (H, W, 3) uint8} of a row (`Build.rows(as_tensors=False)`), every latent mean decoded."""
    import torch

    pictures = {}
    for key, (mean, _) in row["latents"].items():
        with torch.no_grad():
            pixels = tokenizer.decode(torch.from_numpy(np.array(mean, copy=True))[None])[0]
        pictures[key] = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return pictures


def row_prompts(row: dict[str, Any], caption: str | None = None) -> list[str]:
    """The prompt the trainer builds for each single-view task this row feeds (text2image, then one per condition
    modality), with `caption` (default: the row's first caption): model/views.full_prompt with the colour entries
    of semantic maps and boxes, exactly as training/samples.make_sample builds them."""
    from model.tasks import TASKS, get_task
    from model.views import full_prompt

    if caption is None:
        captions = row.get("captions") or []
        caption = captions[0]["text"] if captions else ""
    prompts = [full_prompt(get_task("text2image"), caption)]
    conditions = {m for (v, m) in row["latents"] if v == 0 and m != "image"}
    for task in TASKS.values():
        if task.view_layout == "fixed" and len(task.view_roles) == 2 and task.view_roles[1] in conditions:
            prompts.append(full_prompt(task, caption, prompt_kwargs(task, row, 0)))
    return prompts


# --- the sheet -----------------------------------------------------------------------------------------------------

def contact_sheet(rows: list[dict[str, Any]], tokenizers: Tokenizers, cell: int = 128
                  ) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One band per row: a title, every (view, modality) decoded from its latent mean (shrunk to fit `cell`, never
    enlarged: a cell at least the bucket size shows the pixels 1:1) with its label, and beside them the caption and
    the prompt of every task the row feeds. Returns the sheet and each picture's box on it."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    bands = []
    for row in rows:
        pictures = decode_views(row, tokenizers.get(row["image_tokenizer"], row.get("image_tokenizer_sha")))
        title = (f"{row['id']}  {row['source']}  resolution {row['resolution']}  {row['bucket_h']}x{row['bucket_w']}  "
                 f"{row['split']}  {row['num_views']} view(s)")
        captions = row.get("captions") or []
        lines = _panel_lines(measure, font, captions, row_prompts(row, "<caption>" if captions else ""))
        height = max(cell + 2 * LINE, (len(lines) + 1) * LINE) + 6
        bands.append(((row["id"], row["resolution"]), title, pictures, lines, height))
    columns = max((len(band[2]) for band in bands), default=1)
    sheet = Image.new("RGB", (columns * (cell + 2) + PROMPT_PANEL, max(1, sum(band[4] for band in bands))), "white")
    draw = ImageDraw.Draw(sheet)
    cells = []
    top = 0
    for (row_id, resolution), title, pictures, lines, height in bands:
        if top:
            draw.line([(0, top - 2), (sheet.width, top - 2)], fill=(200, 200, 200))
        draw.text((2, top), title, fill="black", font=font)
        for c, ((view, modality), picture) in enumerate(pictures.items()):
            image = Image.fromarray(picture)
            image.thumbnail((cell, cell))  # only ever shrinks
            x0 = c * (cell + 2) + (cell - image.width) // 2
            y0 = top + LINE + (cell - image.height) // 2
            sheet.paste(image, (x0, y0))
            cells.append({"id": row_id, "resolution": resolution, "view": view, "modality": modality,
                          "box": [x0, y0, x0 + image.width, y0 + image.height]})
            draw.text((c * (cell + 2) + 2, top + LINE + cell + 1), f"v{view} {modality}", fill="black", font=font)
        left = len(pictures) * (cell + 2) + 6
        for i, (line, is_caption) in enumerate(lines):
            draw.text((left, top + LINE + i * LINE), line, fill=(0, 0, 0) if is_caption else (30, 30, 140),
                      font=font)
        top += height
    return sheet, cells


def _panel_lines(draw: ImageDraw.ImageDraw, font, captions: list[dict], prompts: list[str]) -> list[tuple[str, bool]]:
    """(line, is caption) of a row's text: each caption with its name and origin (the source's, a labeler's), cut
    after a few lines, then each task's prompt (built with <caption> standing for the one the trainer draws)."""
    width = PROMPT_PANEL - 8
    marked = [] if captions else [("no caption", True)]
    for caption in captions:
        lines = _wrap(draw, font, f"{caption['name']} ({caption['origin']}): {caption['text']}", width)
        if len(lines) > CAPTION_LINES:
            lines = lines[:CAPTION_LINES]
            lines[-1] = lines[-1][:-3].rstrip() + "..."
        marked += [(line, True) for line in lines]
    for prompt in prompts:
        marked += [(line, False) for line in _wrap(draw, font, prompt, width)]
    return marked


def _wrap(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return lines + ([current] if current else [])


def inspect_build(target: str, out: str | None = None, samples: int = 8, seed: int = 0,
                  cell: int = 128) -> Inspection:
    """Summarise the build at `target` (a build URI, a root holding one build) and, when it has rows, write the
    contact sheet of `samples` random rows to `out` (default NAME_contact_sheet.png; a local path or s3:// URI)."""
    from onegen.errors import UsageError

    try:
        build = open_build(target)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    result = Inspection(summarise(build))
    if result.summary["rows"] and samples > 0:
        tokenizers = Tokenizers()
        rows = sample_rows(build, samples, seed)
        sheet, result.cells = contact_sheet(rows, tokenizers, cell)
        result.rows = len(rows)
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        result.sheet = out or f"{build.name}_contact_sheet.png"
        storage, name = Storage.for_file(result.sheet)
        storage.write_bytes(name, buffer.getvalue())
        result.warnings = tokenizers.warnings
    return result


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=1, sort_keys=True)
