"""Historical ticks from CSV or Parquet into ``ticks``, exactly once (``nadi import``)."""

from nadi.importer.mapping import ColumnMapping, MappingError, load_mapping
from nadi.importer.run import ImportConflict, ImportResult, default_source, import_file

__all__ = [
    "ColumnMapping",
    "ImportConflict",
    "ImportResult",
    "MappingError",
    "default_source",
    "import_file",
    "load_mapping",
]
