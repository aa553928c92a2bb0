"""The sections that say what each request is made of: ``input`` (and its ``dataset``), ``prompt``, and
``image`` with the text-to-image ``parameters`` it governs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from batchrun.spec._model import (
    IMAGE_FORMATS,
    INPUT_KINDS,
    OPENAI_BATCH_ID,
    SEED_MAX,
    DatasetSpec,
    ImageSpec,
    InputSpec,
    PromptSpec,
    _template_fields,
)
from batchrun.spec._read import _NATURAL, _REQUIRED, _STRING, _describe, _KeyReader, _suggest
from batchrun.spec._shape import default_of, spec_keys
from batchrun.task_kinds import TASK_KINDS, TaskKind

# The input section names its kind by its key (parquet, jsonl, dataset or openai_batch), so it is not one to one.
_INPUT_KEYS = (*INPUT_KINDS, *(key for key in spec_keys(InputSpec) if key not in INPUT_KINDS))
_DATASET_KEYS = spec_keys(DatasetSpec)
_PROMPT_KEYS = spec_keys(PromptSpec)
_IMAGE_KEYS = spec_keys(ImageSpec)
# The tasks that take an image section, and the keys each takes, from the task registry.
_IMAGE_KEYS_BY_TASK = {kind.name: kind.image_keys for kind in TASK_KINDS.values() if kind.image_keys}
# The toolkit's documented text-to-image parameters, and what each must be.
_TEXT_TO_IMAGE_PARAMETERS = {
    "negative_prompt": "a string",
    "num_inference_steps": "a positive integer",
    "guidance_scale": "a number",
    "width": "a positive integer",
    "height": "a positive integer",
}


class _InputParser(_KeyReader):
    """The input, prompt and image sections of a job."""

    def input(self, data: Any) -> InputSpec:
        if self.in_memory:
            return self.memory_input(data)
        data = self.section(data, "input", _INPUT_KEYS)
        kind = self.exactly_one(data, "input", INPUT_KINDS)
        path = None
        dataset = None
        if kind == "dataset":
            dataset = self.dataset(data["dataset"])
        else:
            path = self.read(data, kind, _STRING, prefix="input.")
        limit = self.key(InputSpec, data, "limit", prefix="input.")
        keep = data.get("keep_columns")
        keep_columns = None
        if keep is not None:
            if not isinstance(keep, list) or not all(isinstance(c, str) and c for c in keep):
                raise self.error("input.keep_columns", f"expected a list of column names, got {_describe(keep)}")
            keep_columns = tuple(keep)
        allow_empty = self.key(InputSpec, data, "allow_empty", prefix="input.")
        id_column = self.key(InputSpec, data, "id_column", prefix="input.")
        if kind == "openai_batch":
            if id_column is not None:
                raise self.error("input.id_column", "does not apply to input.openai_batch: the ids are its custom_id")
            id_column = OPENAI_BATCH_ID
        return InputSpec(
            kind=kind,
            path=path,
            dataset=dataset,
            id_column=id_column,
            limit=limit,
            keep_columns=keep_columns,
            allow_empty=allow_empty,
        )

    def memory_input(self, data: Any) -> InputSpec:
        """The input section of a job whose rows come from Python: the options only, no kind."""
        data = self.section(data if data is not None else {}, "input", _INPUT_KEYS)
        named = [kind for kind in INPUT_KINDS if kind in data]
        if named:
            raise self.error(f"input.{named[0]}", "the rows are given in Python (input=...): leave the input's "
                                                  "kind out of the spec, or do not pass input=")
        keep = data.get("keep_columns")
        if keep is not None and not (isinstance(keep, list) and all(isinstance(c, str) and c for c in keep)):
            raise self.error("input.keep_columns", f"expected a list of column names, got {_describe(keep)}")
        return InputSpec(
            kind="memory",
            id_column=self.key(InputSpec, data, "id_column", prefix="input."),
            limit=self.key(InputSpec, data, "limit", prefix="input."),
            keep_columns=None if keep is None else tuple(keep),
            allow_empty=self.key(InputSpec, data, "allow_empty", prefix="input."),
        )

    def dataset(self, data: Any) -> DatasetSpec:
        if isinstance(data, str):
            # `dataset: user/name` is the common case; let it stand for `dataset: {path: user/name}`.
            data = {"path": data}
        data = self.section(data, "input.dataset", _DATASET_KEYS)
        if "path" not in data:
            raise self.error(
                "input.dataset.path", "is required (a Hub dataset id, a folder, or a builder like 'parquet')"
            )
        data_files = data.get("data_files")
        if data_files is not None and not _is_data_files(data_files):
            raise self.error(
                "input.dataset.data_files",
                f"expected a path, a list of paths, or a mapping of split to paths, got {_describe(data_files)}",
            )
        options = data.get("options")
        if options is None:
            options = {}
        elif not isinstance(options, Mapping):
            raise self.error(
                "input.dataset.options", f"expected a mapping of builder keywords, got {_describe(options)}"
            )
        prefix = "input.dataset."
        return DatasetSpec(
            path=self.key(DatasetSpec, data, "path", prefix=prefix),
            name=self.key(DatasetSpec, data, "name", prefix=prefix),
            split=self.key(DatasetSpec, data, "split", prefix=prefix),
            data_files=data_files,
            data_dir=self.key(DatasetSpec, data, "data_dir", prefix=prefix),
            revision=self.key(DatasetSpec, data, "revision", prefix=prefix),
            options=dict(options),
        )

    def prompt(self, data: Any, kind: TaskKind) -> PromptSpec:
        data = self.section(data, "prompt", _PROMPT_KEYS)
        messages_column = self.messages_column(data, kind)
        source = self.exactly_one(data, "prompt", ("template", "column")) if messages_column is None else None
        template = column = None
        if source == "template":
            template = self.key(PromptSpec, data, "template", prefix="prompt.", default=_REQUIRED)
            try:
                fields = _template_fields(template)
            except ValueError as exc:
                problem = f"expected a template with {{column}} placeholders: {exc}"
                raise self.error("prompt.template", problem) from None
            if not fields:
                raise self.error(
                    "prompt.template",
                    "expected at least one {column} placeholder; use prompt.column for a column as it is",
                )
        elif source == "column":
            column = self.key(PromptSpec, data, "column", prefix="prompt.", default=_REQUIRED)
        system = self.key(PromptSpec, data, "system", prefix="prompt.")
        if system is not None and not kind.takes_system:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.takes_system)
            raise self.error("prompt.system", f"only applies to tasks {owners}, not {kind.name}")
        image_column = self.key(PromptSpec, data, "image_column", prefix="prompt.")
        schema_column = self.key(PromptSpec, data, "schema_column", prefix="prompt.")
        texts_column = self.key(PromptSpec, data, "texts_column", prefix="prompt.")
        if (texts_column is None) == kind.takes_texts:
            which = "is required for" if kind.takes_texts else "only applies to task rerank, not"
            raise self.error("prompt.texts_column", f"{which} {kind.name} (the column of candidate texts)")
        if messages_column is not None and image_column is not None:
            raise self.error(
                "prompt.image_column",
                "does not apply with prompt.messages_column: a conversation carries its images as image parts "
                "of its messages' content",
            )
        if kind.image_column == "required" and image_column is None and messages_column is None:
            raise self.error(
                "prompt.image_column", f"is required for task {kind.name} (the input column holding the image)"
            )
        if kind.image_column == "forbidden" and image_column is not None:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.image_column == "required")
            raise self.error("prompt.image_column", f"only applies to task {owners}, not {kind.name}")
        return PromptSpec(
            template=template, column=column, system=system, image_column=image_column,
            messages_column=messages_column,
            schema_column=schema_column,
            texts_column=texts_column,
        )

    def messages_column(self, data: Mapping[str, Any], kind: TaskKind) -> str | None:
        """``prompt.messages_column``: the conversation is the whole prompt, so nothing else may build one."""
        if "messages_column" not in data:
            return None
        if not kind.takes_messages:
            owners = " and ".join(k.name for k in TASK_KINDS.values() if k.takes_messages)
            raise self.error("prompt.messages_column", f"only applies to tasks {owners}, not {kind.name}")
        both = [key for key in ("template", "column") if key in data]
        if both:
            raise self.error(
                "prompt.messages_column",
                f"is the whole prompt (each row's conversation); remove prompt.{' and prompt.'.join(both)}, "
                "or drop messages_column to build a one-turn prompt from the row",
            )
        name: str = self.key(PromptSpec, data, "messages_column", prefix="prompt.", default=_REQUIRED)
        return name

    def image(self, data: Any, kind: TaskKind) -> ImageSpec | None:
        task = kind.name
        if not kind.image_keys:
            if data is not None:
                raise self.error("image", f"only applies to tasks {' and '.join(_IMAGE_KEYS_BY_TASK)}, not {task}")
            return None
        if data is None:
            return ImageSpec()
        data = self.section(data, "image", _IMAGE_KEYS)
        allowed = kind.image_keys
        for key in data:
            if key not in allowed:
                owner = next(t for t, keys in _IMAGE_KEYS_BY_TASK.items() if key in keys)
                raise self.error(
                    f"image.{key}", f"only applies to task {owner}, not {task}; expected one of {', '.join(allowed)}"
                )
        fmt = data.get("format", default_of(ImageSpec, "format"))
        if isinstance(fmt, str) and fmt.lower() == "jpg":
            fmt = "jpeg"
        if not isinstance(fmt, str) or fmt.lower() not in IMAGE_FORMATS:
            hint = _suggest(fmt.lower(), IMAGE_FORMATS) if isinstance(fmt, str) else ""
            raise self.error("image.format", f"expected one of {', '.join(IMAGE_FORMATS)}, got {_describe(fmt)}{hint}")
        seed = self.read(data, "seed", _NATURAL, prefix="image.", default=default_of(ImageSpec, "seed"))
        if seed > SEED_MAX:
            raise self.error("image.seed", f"expected a non-negative integer below 2**63, got {seed}")
        return ImageSpec(
            format=fmt.lower(),
            seed_column=self.key(ImageSpec, data, "seed_column", prefix="image."),
            seed=seed,
            max_side=self.key(ImageSpec, data, "max_side", prefix="image."),
            base_dir=self.key(ImageSpec, data, "base_dir", prefix="image."),
        )

    def text_to_image_parameters(self, parameters: Mapping[str, Any]) -> None:
        if "seed" in parameters:
            raise self.error(
                "parameters.seed",
                "is set per row for text-to-image: name a column with image.seed_column, or let batchrun "
                "derive each row's seed from its id (change image.seed to draw a different set)",
            )
        for key, expected in _TEXT_TO_IMAGE_PARAMETERS.items():
            if key not in parameters:
                continue
            value = parameters[key]
            if expected == "a string":
                ok = isinstance(value, str)
            elif expected == "a number":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise self.error(f"parameters.{key}", f"expected {expected}, got {_describe(value)}")


def _is_data_files(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, list):
        return all(isinstance(v, str) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_data_files(v) and not isinstance(v, Mapping) for k, v in value.items())
    return False
