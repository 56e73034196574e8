"""A user's extension module, as a config file imports it: a loss, a data source kind and an
evaluator, each added by one `register` call and none by an edit to vljax (tests/test_extensions.py
trains and evaluates with all three through `python -m vljax.main`)."""
import numpy as np
from helpers import COLOURS, SHAPES, _draw

from vljax import evaluators, losses, objective
from vljax.data import sources
from vljax.evaluators import base
from vljax.evaluators import data as data_lib

LOSS, SOURCE, EVALUATOR = "toy_offset_softmax", "toy_shapes", "toy_geometry"


def offset_softmax(zimg, ztxt, t, axis_name=None, offset=0.0):
    """CLIP's softmax loss plus a constant `offset` (config `loss.offset`): the same gradients, and
    a logged loss that tells this loss was the one computed."""
    return losses.softmax_contrastive(zimg, ztxt, t, axis_name=axis_name) + offset


class ToyShapes(sources.Source):
    """`n` drawn images of coloured shapes (32 x 32 pixels, captioned "a red circle"), labelled by
    shape; `seed` draws other ones."""
    REQUIRED = ("n",)
    OPTIONAL = ("seed",)

    def __init__(self, n, seed=0):
        self.n, self.seed = int(n), int(seed)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        image = np.asarray(_draw(shape, colour, np.random.default_rng([self.seed, i])), np.uint8)
        return {"id": f"toy{self.seed}/{i}", "image": image, "captions": [f"a {colour} {shape}"],
                "label": i % len(SHAPES), "labels": []}

    def cache_key(self):
        return sources.base.digest(SOURCE, self.n, self.seed)

    def gives_label(self):
        return True

    def class_names_of(self, key=None):
        self._no_key(key, "label")
        return list(SHAPES)


class ToyGeometry(base.Evaluator):
    """Embeds every record of its data `repeats` times. Metrics "toy_geometry/<name>/dim" (the
    embedding width), ".../repeat_cos" (mean cosine of a record's embeddings with each other: 1
    for a deterministic model) and ".../spread" (1 - the mean cosine of distinct records: 0 when
    every image embeds alike)."""
    DATA_KEYS = ("name", "split", "data_dir", "max_examples", "source")

    def __init__(self, data, *, name: str, repeats: int = 2):
        if repeats < 2:
            raise ValueError(f"{name}: repeats must be >= 2, got {repeats}")
        self.data, self.name, self.repeats = data, name, int(repeats)

    @classmethod
    def from_config(cls, name, spec, *, plot_dir=None):
        del plot_dir  # no plots
        data, kwargs = data_lib.split_spec(name, spec)
        data_lib.check_keys(name, data, cls.DATA_KEYS)
        source = data_lib.first(data_lib.open_entry(name, data), data.get("max_examples"))
        return cls(source, name=name, **kwargs)

    def run(self, embedder):
        n = len(self.data)
        z, index = base.image_embeddings(embedder, data_lib.Subset(self.data, list(range(n)) * self.repeats))
        if len(index) != n * self.repeats:
            raise ValueError(f"{self.name}: {n * self.repeats - len(index)} records could not be read")
        z = z.reshape(self.repeats, n, -1)
        repeat_cos = np.mean([np.sum(z[0] * z[r], -1) for r in range(1, self.repeats)])
        cos = z[0] @ z[0].T
        spread = 1.0 - (cos.sum() - np.trace(cos)) / (n * (n - 1))
        prefix = f"{EVALUATOR}/{self.name}"
        return {f"{prefix}/dim": float(z.shape[-1]), f"{prefix}/repeat_cos": float(repeat_cos),
                f"{prefix}/spread": float(spread)}


def register():
    """The three calls a user's module makes (a config file calls this before returning its config)."""
    objective.register(LOSS, offset_softmax, ("zimg", "ztxt", "t"), logits="sigmoid", replace=True)
    sources.register(SOURCE, ToyShapes)
    evaluators.register(EVALUATOR, ToyGeometry)


def unregister():
    """Leaves the registries as vljax defines them (other tests state their contents)."""
    objective.LOSSES.pop(LOSS, None)
    sources.SOURCES.pop(SOURCE, None)
    evaluators.EVALUATORS.pop(EVALUATOR, None)
