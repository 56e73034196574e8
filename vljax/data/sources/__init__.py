"""Random-access record sources for grain, one kind a module, registered by the name a config
entry gives in `source=`: "tfds" (TFDS array_record), "folder" (images + captions), "jsonl" (a
manifest). `base.py` holds the contract (`Source`) and the registry; a new kind is one module
here (registered with `@base.register(kind)`; every module of this package is imported) or, from
outside vljax, any module that calls `register(kind, cls)` before the config is read.

Every source has `__len__` and `__getitem__(i) -> record`, a plain dict:

    {"id": str, "image": bytes | str | uint8 array (encoded image, a file path, or pixels),
     "captions": list[str], "label": int (-1 when the source has no label_key),
     "labels": list[int] (a label set, e.g. multi-hot tags; empty when none)}

Label sets: a source that has them says how many classes they index (`num_labels`, K) and their
names (`label_names`, K strings); the pipeline maps every source's sets into one label space (the
union of the names) and batches them multi-hot (`config.input.labels`).

plus, for a record that cannot be read, `"error": reason` (one of preprocess.SKIP_REASONS) and
`"detail"`. Per-record problems never raise: the pipeline skips such records and counts them, so
one bad file cannot stop a training run. Problems with the source itself (a missing dataset or
manifest, a malformed manifest line) raise at construction, naming the file and line.
"""
import importlib
import pkgutil

from vljax.data.sources.base import (DEFAULT_KIND, ENTRY_KEYS, IMAGE_EXTENSIONS, SOURCES, Source,
                                     cache_key, check_entry, default_assets_dir, default_data_dir,
                                     get_source, missing_labels, register, source_class)
from vljax.data.sources.folder import FolderSource
from vljax.data.sources.jsonl import JsonlSource
from vljax.data.sources.tfds import TfdsSource
from vljax.data.sources.wrappers import (HideLabels, LabelsIn, WithFeatures, check_hide_labels,
                                         hidden_labels_record, hidden_of, label_space)

# Any other kind module of this package registers itself on import: adding a kind is one file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module
