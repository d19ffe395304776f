"""The MLflow pyfunc of a OneDiffusion pipeline (INTERFACES §4), logged as "model from code": MLflow copies this file
into the model and runs it to load, with `model/` beside it (code_paths), so a registered version loads wherever
MLflow and torch are installed, without onegen. A LoRA version holds its adapter and base.json: the base is loaded
from its URI at the recorded commit or version (checked against its sha256), then the adapter applied (diffusers'
PeftAdapterMixin.load_lora_adapter).

Request (one row per request; a pandas DataFrame, or a list of dicts):
    task      a task of model/tasks.py (text2image, depth2image, multiview, ...)
    prompt    the caption (the task token and syntax are added)
    images    base64 PNG/JPEG condition images, in the task's frame order (none for text2image)
    direction the task's direction (default its first: "generate"); "estimate" for depth/pose/... estimation
    steps, cfg, seed, height, width    sampling steps, guidance scale, noise seed, output size (defaults: 20, 1.0,
              0, the pipeline's default size)
Response (one row per request): images (base64 PNGs of the generated views) and arrays (base64 .npy of the estimated
maps: depth for depth estimation). A bad request raises MlflowException(INVALID_PARAMETER_VALUE): `mlflow models
serve` answers it with a 400 and the message, no stack trace.
"""

from __future__ import annotations

import base64
import binascii
import io

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

DEFAULTS = {"images": None, "direction": None, "steps": 20, "cfg": 1.0, "seed": 0, "height": None, "width": None}
MAX_STEPS = 1000


def bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class OneDiffusionModel(PythonModel):
    def load_context(self, context) -> None:
        from model.pipeline import OneDiffusionPipeline

        adapter = context.artifacts.get("adapter")
        if adapter is None:
            self.pipe = OneDiffusionPipeline.from_pretrained(context.artifacts["pipeline"])
        else:
            self.pipe = load_base_with_adapter(adapter)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        return pd.DataFrame([self.answer(dict(row)) for row in rows])

    def answer(self, request: dict) -> dict:
        import numpy as np

        from model.tasks import get_task

        request = {**DEFAULTS, **{k: v for k, v in request.items() if not _missing(v)}}
        try:
            task = get_task(str(request["task"]))
        except KeyError as err:
            raise bad_request(str(err).strip("'\"")) from None
        images = [_image(item, i) for i, item in enumerate(_as_list(request["images"]))]
        steps = _integer(request, "steps", 1, MAX_STEPS)
        try:
            result = self.pipe(task.name, str(request.get("prompt") or ""), images=images or None,
                               direction=request["direction"], num_inference_steps=steps,
                               guidance_scale=float(request["cfg"]), seed=_integer(request, "seed", 0, 2**63 - 1),
                               height=_integer(request, "height", 1, 4096, optional=True),
                               width=_integer(request, "width", 1, 4096, optional=True), output_type="pil",
                               progress=False)
        except (ValueError, KeyError) as err:
            raise bad_request(f"{task.name}: {err}") from None
        arrays = [] if result.depth is None else [_npy(np.asarray(depth)) for depth in result.depth]
        return {"images": [_png(image) for image in result.images], "arrays": arrays}


def load_base_with_adapter(adapter: str):
    """The base pipeline base.json names (a hub id at its commit, a folder, or a registered version of this
    tracking server), refused if its transformer weights are not the ones the adapter was trained on, with the
    adapter loaded."""
    import json
    from pathlib import Path

    from model.lora import LORA_WEIGHTS_NAME
    from model.nextdit import weights_sha256
    from model.pipeline import OneDiffusionPipeline

    base = json.loads((Path(adapter) / "base.json").read_text())
    uri, revision = base["uri"], base.get("revision")
    if uri.startswith("models:/"):  # parsed here: this file is loaded without onegen (onegen.registry's parser)
        name = uri[len("models:/"):].split("@")[0].split("/")[0]
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{revision}")) / "artifacts" / "pipeline"
        pipe = OneDiffusionPipeline.from_pretrained(folder)
    else:
        pinned = {} if Path(uri).is_dir() or revision is None else {"revision": revision}  # a hub id's commit
        pipe = OneDiffusionPipeline.from_pretrained(uri, **pinned)
    found = weights_sha256(Path(pipe.transformer.config["_name_or_path"]))
    if found != base["sha256"]:
        raise MlflowException(f"the LoRA adapter was trained on {uri} with transformer weights sha256 "
                              f"{base['sha256'][:12]}..., but {uri} now holds {found[:12]}...; serve the adapter with "
                              "its own base")
    pipe.transformer.load_lora_adapter(adapter, prefix="transformer", weight_name=LORA_WEIGHTS_NAME)
    return pipe


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: a column absent from a row


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _integer(request: dict, key: str, low: int, high: int, optional: bool = False) -> int | None:
    value = request[key]
    if value is None and optional:
        return None
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise bad_request(f"{key}={value!r}: expected an integer") from None
    if not low <= number <= high:
        raise bad_request(f"{key}={number}: expected {low}..{high}")
    return number


def _image(text, index: int):
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode(str(text), validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as err:
        raise bad_request(f"images[{index}]: not a base64-encoded PNG or JPEG ({err})") from None


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _npy(array) -> str:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


mlflow.models.set_model(OneDiffusionModel())
