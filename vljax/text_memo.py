"""The text tower's locked lowest blocks, run once per distinct text (`config.text_cache`).

With the text tower's embeddings and its k lowest blocks locked (`step.locked_text_blocks`; LiT
with a partly tuned text tower, as configs/lit.py trains MiniLM), what those blocks make of a text
never changes during a run. A `TextMemo` keeps their output per distinct token row in host memory:
each caption's states are computed the first time it is drawn, and every later step (and every
evaluation's class prompts and captions) runs only the blocks above them
(`TwoTowers.__call__(..., text_lower=(k, states))`), the same arithmetic as the unsplit tower
(tests/test_text_memo.py checks step-by-step equality). On a small data set seen for many epochs
this removes k/depth of the text tower's forward pass from every step; on a web-scale stream,
where a caption is rarely seen twice, it saves nothing: leave it off there.

With every block locked (k = depth; LLM2CLIP's frozen text encoder, configs/clip.py llm2clip=on)
the memo holds each text's final token states, and a step runs only what is above the trunk:
the pooling (BERT's mean over real tokens; a TextTransformer's final norm first), the trainable
adapter (`adapter_{i}`, `adapter_norm`) and the head. That is LLM2CLIP's "caption embeddings are
data" up to the pooling, a few flops a token, which stays in the step: the memo keeps [L, W] a
text, not [W].

Misses are computed on this process's devices only (each process memoises the rows it reads, so
processes never need to agree on a shape), from a host copy of the locked parameters taken once, in
chunks of `chunk` rows, the last one padded to the smallest of chunk, chunk / 2, ... (at least 8 rows
a device) that holds it: a step that meets a few new captions (a data set with several captions per
record keeps showing new ones for epochs) computes a few rows, not a whole batch, with a handful of
compilations in all. A row's states are the same whatever rows share its chunk (XLA:CPU rows of a
dense layer are bitwise equal from 4 rows a device up, docs/TOOLCHAIN.md). Memory is bounded by `max_bytes`: once it is
full, new rows are computed and used but not kept.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax.models.two_towers import TwoTowers

_BLOCK = re.compile(r"^txt/(?:Encoder_0/)?encoderblock_(\d+)/")
# What runs above the blocks: final norm, pooling, LLM2CLIP's adapter (vljax/models/text_adapter.py), head.
_ABOVE = re.compile(r"^txt/(?:Encoder_0/encoder_norm|MAPHead_0|pooler|adapter_\d+|adapter_norm|head)/")


def locked_text_blocks(spec: dict, trainable_mask) -> int:
    """How many of the text tower's lowest blocks are locked together with everything below them
    (embeddings, position embedding): those run once per text, not in every step (the label
    prompts of the multi-label loss, and with `config.text_cache` every caption). 0 when nothing
    is locked there, when the tower's dropout is on (a locked block still draws dropout masks in
    training, so its output is not fixed), or when the blocks are scanned (stacked: one parameter
    for every block)."""
    text = spec["model"].get("text") or {}
    if spec["model"].get("text_model", "text_transformer") not in ("text_transformer", "bert"):
        return 0  # the towers that take stop_after / lower
    if text.get("dropout") or text.get("dropout_rate") or text.get("scan"):
        return 0
    trainable = {k: v for k, v in traverse_util.flatten_dict(trainable_mask, sep="/").items()
                 if k.startswith("txt/")}
    blocks: dict[int, bool] = {}
    for k, v in trainable.items():
        m = _BLOCK.match(k)
        if m:
            i = int(m.group(1))
            blocks[i] = blocks.get(i, False) or bool(v)
        elif not _ABOVE.match(k) and v:
            return 0  # an embedding table trains: every block's input changes
    n = 0
    while n in blocks and not blocks[n]:
        n += 1
    return n


def lower_params(params, blocks: int) -> dict:
    """The flat `txt/...` params that the embeddings and the `blocks` lowest blocks read."""
    out = {}
    for k, v in traverse_util.flatten_dict(params, sep="/").items():
        if not k.startswith("txt/") or _ABOVE.match(k):
            continue
        m = _BLOCK.match(k)
        if m is None or int(m.group(1)) < blocks:
            out[k] = v
    return out


class TextMemo:
    """`memo(ids)`: int [N, L] token rows -> their states after the locked lower text blocks,
    [N, L, W] (the tower's dtype), computed once per distinct row (see the module docstring).

    model: the TwoTowers; params: its params (global arrays of any sharding, or host arrays), of
    which only the locked lower part is read, once; blocks: k > 0, how many blocks are locked
    (`step.locked_text_blocks`); chunk: rows per computation (rounded up to a multiple of this
    process's device count); max_bytes: the memory the kept states may take.
    """

    def __init__(self, model: TwoTowers, params, blocks: int, *, chunk: int = 128,
                 max_bytes: int = 4 << 30):
        if blocks < 1:
            raise ValueError(f"TextMemo needs at least one locked text block, got blocks={blocks}")
        self.blocks, self.max_bytes = int(blocks), int(max_bytes)
        devices = jax.local_devices()
        self._devices = len(devices)
        self.chunk = -(-int(chunk) // len(devices)) * len(devices)
        mesh = Mesh(np.asarray(devices), ("rows",))
        self._rows_sh, replicated = NamedSharding(mesh, P("rows")), NamedSharding(mesh, P())
        host = {k: (multihost_utils.process_allgather(v, tiled=True) if isinstance(v, jax.Array)
                    else np.asarray(v)) for k, v in lower_params(params, blocks).items()}
        self._params = jax.device_put(traverse_util.unflatten_dict(host, sep="/"), replicated)
        self._fn = jax.jit(lambda p, t: model.apply({"params": p}, t, self.blocks,
                                                    method=TwoTowers.text_lower),
                           out_shardings=self._rows_sh)
        self._kept: dict[bytes, np.ndarray] = {}
        self.bytes = 0
        self.computed = 0  # rows computed so far (misses), for logs and tests

    def __len__(self) -> int:
        return len(self._kept)

    def _rows_for(self, n: int) -> int:
        """The padded size of a chunk of n <= chunk rows: chunk halved while it still holds n, stays
        a multiple of the devices and keeps at least 8 rows a device."""
        size, floor = self.chunk, 8 * self._devices
        while size % 2 == 0 and size // 2 >= max(n, floor) and (size // 2) % self._devices == 0:
            size //= 2
        return size

    def _compute(self, ids: np.ndarray) -> np.ndarray:
        out = []
        for lo in range(0, len(ids), self.chunk):
            part = ids[lo:lo + self.chunk]
            size = self._rows_for(len(part))
            pad = np.concatenate([part, np.repeat(part[-1:], size - len(part), 0)])
            x = jax.device_put(pad, self._rows_sh)
            out.append(np.asarray(self._fn(self._params, x))[:len(part)])
        self.computed += len(ids)
        return np.concatenate(out)

    def __call__(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(ids, np.int32))
        if ids.ndim != 2:
            raise ValueError(f"TextMemo takes token ids [N, L], got shape {ids.shape}")
        keys = [row.tobytes() for row in ids]  # rows of another length differ in size
        missing = {}  # key -> first row index, in order, without repeats
        for i, k in enumerate(keys):
            if k not in self._kept and k not in missing:
                missing[k] = i
        new = {}
        if missing:
            states = self._compute(ids[list(missing.values())])
            for k, s in zip(missing, states):
                new[k] = s
                if self.bytes + s.nbytes <= self.max_bytes:
                    self._kept[k] = s
                    self.bytes += s.nbytes
        return np.stack([self._kept[k] if k in self._kept else new[k] for k in keys])
