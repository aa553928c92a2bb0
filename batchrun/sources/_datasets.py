"""``datasets`` input: a ``save_to_disk`` folder, or anything ``load_dataset`` takes, streamed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchrun.errors import InputError
from batchrun.sources._base import ID_SCAN_BATCH, DoneMask, _BaseSource, _non_empty, _TableSource
from batchrun.sources._files import _file_digest, _fingerprint, _plural, _relative_name
from batchrun.spec import DatasetSpec, InputSpec


def _saved_dataset_folder(spec: DatasetSpec) -> Path | None:
    """The folder of a dataset written by ``save_to_disk`` that ``spec`` names, if it names one."""
    path = Path(spec.path)
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        split_folder = path / spec.split
        if not split_folder.is_dir():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise InputError(
                f"input.dataset.split: {spec.path!r} has no split {spec.split!r}; available splits: {', '.join(splits)}"
            )
        path = split_folder
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        unused = [k for k in ("name", "data_files", "data_dir", "revision") if getattr(spec, k) is not None]
        if unused or spec.options:
            raise InputError(
                f"input.dataset: {spec.path!r} was written by save_to_disk; "
                f"{', '.join(unused + (['options'] if spec.options else []))} do not apply to it"
            )
        return path
    return None


class SavedDatasetSource(_TableSource):
    """Rows from a folder written by ``Dataset.save_to_disk``, read from its memory-mapped table."""

    def __init__(self, spec: InputSpec, folder: Path) -> None:
        super().__init__(spec)
        import datasets  # heavy; only imported when a dataset input is used

        try:
            dataset = datasets.load_from_disk(str(folder))
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            raise InputError(f"input.dataset: cannot load {str(folder)!r} (written by save_to_disk): {exc}") from None
        self.folder = folder
        self._table: pa.Table = dataset.data.table
        self.schema = dataset.features.arrow_schema
        self._num_rows = dataset.num_rows
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".arrow")
        self._identity = [{"name": p.name, "size": p.stat().st_size, "digest": _file_digest(p)} for p in files]
        assert spec.dataset is not None
        self.description = (
            f"dataset: {spec.dataset.path} (saved with save_to_disk, split {spec.dataset.split}, "
            f"{_plural(self._num_rows, 'row')})"
        )

    def _total_rows(self) -> int:
        return self._num_rows

    def fingerprint(self) -> str:
        return _fingerprint({"kind": "saved-dataset", "id_column": self.id_column, "files": self._identity})


class StreamedDatasetSource(_BaseSource):
    """Rows from ``datasets``' streaming mode: Hub datasets, data files, local folders of files."""

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        import datasets  # heavy; only imported when a dataset input is used

        config = spec.dataset
        assert config is not None
        self.config = config
        try:
            self._builder = datasets.load_dataset_builder(
                config.path,
                name=config.name,
                data_dir=config.data_dir,
                data_files=config.data_files,
                revision=config.revision,
                **dict(config.options),
            )
            self._dataset = self._builder.as_streaming_dataset(split=config.split)
        except Exception as exc:  # datasets raises many types here (FileNotFoundError, ValueError, hub errors)
            raise InputError(
                f"input.dataset: cannot open {config.path!r} (split {config.split!r}, relative to {os.getcwd()}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        features = self._dataset.features
        if features is not None:
            self.schema = features.arrow_schema
        else:
            # Builders like CSV and JSON only know their columns once they read; peek at one batch.
            first = next(self._arrow_tables(self._dataset, 64), None)
            self.schema = first.schema if first is not None else pa.schema([])
        self.description = f"dataset: {config.path} (split {config.split}, streamed)"

    def _arrow_tables(self, dataset: Any, batch_size: int) -> Iterator[pa.Table]:
        try:
            # The Arrow format skips feature decoding: Image columns stay {"bytes", "path"}.
            yield from dataset.with_format("arrow").iter(batch_size=batch_size)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"input.dataset: reading {self.config.path!r} failed: {type(exc).__name__}: {exc}"
            ) from None

    def _total_rows(self) -> int | None:
        splits = self._builder.info.splits
        if splits and self.config.split in splits and splits[self.config.split].num_examples:
            return splits[self.config.split].num_examples
        return None

    def fingerprint(self) -> str:
        config = self.config
        files: list[Any] = []
        data_files = self._builder.config.data_files
        if data_files and config.split in data_files:
            resolved = [str(f) for f in data_files[config.split]]
            local = [Path(f) for f in resolved if os.path.isfile(f)]
            root = Path(os.path.commonpath([str(p.resolve().parent) for p in local])) if local else Path(".")
            for name in resolved:
                path = Path(name)
                if path.is_file():
                    files.append(
                        {"name": _relative_name(path, root), "size": path.stat().st_size, "digest": _file_digest(path)}
                    )
                else:
                    files.append({"name": name})  # Hub files carry their commit in the resolved URL
        payload = {
            "kind": "dataset",
            "id_column": self.id_column,
            "path": config.path if not files else None,
            "name": config.name,
            "split": config.split,
            "revision": config.revision,
            "options": dict(config.options),
            "module_hash": getattr(self._builder, "hash", None) if not files else None,
            "files": files,
        }
        return _fingerprint(payload)

    def _chunks(self, batch_size: int, done: DoneMask | None = None) -> Iterator[pa.Table]:
        return _non_empty(self._arrow_tables(self._dataset, batch_size))

    def _id_chunks(self) -> Iterator[pa.Array]:
        ids = self._dataset.select_columns([self.id_column])
        for table in self._arrow_tables(ids, ID_SCAN_BATCH):
            yield table.column(0).combine_chunks()
