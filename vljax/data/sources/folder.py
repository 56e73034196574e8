"""`source="folder"`: images under a folder, with captions in same-named .txt files."""
from __future__ import annotations

from pathlib import Path

from vljax.data.sources import base


@base.register("folder")
class FolderSource(base.Source):
    """Images under `root` (recursively) with captions in a same-named .txt (one caption a line).

    `a/b/cat.jpg` takes its captions from `a/b/cat.txt`. An image without its .txt is counted as
    `missing_file` at read time. With `label_from_folder`, the label is the index of the image's
    parent folder (relative to root) in `self.class_names` (sorted). Config key `path` is `root`.
    """
    REQUIRED = ("path",)
    OPTIONAL = ("label_from_folder",)
    ARGS = {"path": "root"}
    LABEL_HINTS = {"label": "label_from_folder` (True)",
                   "labels": "source` (a folder source has no label sets)"}

    def __init__(self, root, label_from_folder: bool = False):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder source: {self.root} is not a directory")
        self.paths = sorted(p for p in self.root.rglob("*")
                            if p.suffix.lower() in base.IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise ValueError(f"folder source: no images ({', '.join(base.IMAGE_EXTENSIONS)}) under {self.root}")
        self.class_names = sorted({str(p.parent.relative_to(self.root)) for p in self.paths})
        self._label_of = {c: i for i, c in enumerate(self.class_names)}
        self.label_from_folder = label_from_folder
        self.num_labels = self.label_names = None  # no label sets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        txt = path.with_suffix(".txt")
        try:
            captions = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return base.bad_record(str(path), "missing_file", f"no caption file {txt}")
        return {"id": str(path), "image": str(path), "captions": captions,
                "label": self.label_of(index) if self.label_from_folder else -1, "labels": []}

    def cache_key(self) -> str:
        return base.digest("folder", str(self.root))

    def gives_label(self) -> bool:
        return self.label_from_folder

    def label_of(self, index: int, key: str | None = None) -> int:
        """The index of record `index`'s folder in `class_names` (whatever `label_from_folder`)."""
        self._no_key(key, "label")
        return self._label_of[str(self.paths[index].parent.relative_to(self.root))]

    def class_names_of(self, key: str | None = None) -> list[str]:
        """The image folders relative to root, sorted ("." for root itself)."""
        self._no_key(key, "label")
        return list(self.class_names)

    def __repr__(self):
        return f"FolderSource({str(self.root)!r}, n={len(self)})"
