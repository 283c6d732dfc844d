"""Importers: turn a dataset in the layout its users have into a validated manifest.

Each importer writes `<out>/manifest.csv` (plus `<out>/dropped.csv`, the images
it left out and why) and returns the manifest's path. Images are not copied:
paths are relative when the files lie under `out` (write the manifest into the
dataset's own folder for a portable pair) and absolute otherwise. Boxes are
relative 0..1, splits are by patient (or near-duplicate group), and the result
has passed `validate_manifest`.
"""

from busgen_lib.data.importers.busbra import import_busbra
from busgen_lib.data.importers.busi import import_busi
from busgen_lib.data.importers.folder import import_folder
from busgen_lib.data.importers.shared import SHARED_DATASETS, import_shared

__all__ = ["SHARED_DATASETS", "import_busbra", "import_busi", "import_folder", "import_shared"]
