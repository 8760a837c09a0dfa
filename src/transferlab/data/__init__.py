"""Data: raw sources by name, seeded class selection and splits, prepared split files."""

from .prepared import (
    PreparedData,
    Split,
    data_hash,
    load_prepared,
    prepare_dataset,
    read_prepared_meta,
    save_prepared,
)
from .sources import (
    SOURCES,
    DataError,
    RawDataset,
    list_sources,
    load_source,
    read_image_folder,
    register_source,
)
from .split import cap_per_class, one_vs_rest, select_classes, stratified_split

__all__ = [
    "DataError",
    "PreparedData",
    "RawDataset",
    "SOURCES",
    "Split",
    "cap_per_class",
    "data_hash",
    "list_sources",
    "load_prepared",
    "load_source",
    "one_vs_rest",
    "prepare_dataset",
    "read_prepared_meta",
    "read_image_folder",
    "register_source",
    "save_prepared",
    "select_classes",
    "stratified_split",
]
