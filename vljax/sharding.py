"""Device mesh from config, and shardings declared by regex rules over parameter names.

A mesh config names its axes in order, e.g. ``[("data", -1), ("fsdp", 1), ("tensor", 1)]``
(-1: all remaining devices). The batch is split over ``("data", "fsdp")``; parameters are
placed by rules ``[(regex, strategy), ...]`` matched (``re.fullmatch``) against the
"/"-joined parameter name, e.g. ``"img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"``.
The first matching rule wins; unmatched parameters are replicated. Strategies:

* ``"replicate"``: a full copy on every device.
* ``"fsdp"``: the largest dimension divisible by the ``fsdp`` axis size is split over it
  (ties go to the earlier dimension); replicated when no dimension divides or the mesh has
  no ``fsdp`` axis larger than 1.
* a ``PartitionSpec`` or a tuple of axis names (or ``None``, or tuples of names) one per
  leading dimension, e.g. ``("fsdp", "tensor")`` for a tensor-parallel kernel.

Optimizer states follow their parameters: an optax state leaf whose trailing dict keys
spell a parameter name (``mu``/``nu``/accumulated gradients are params-shaped subtrees)
gets that parameter's rule, applied to the leaf's own shape (so adafactor's factored
moments are handled too); every other leaf (counts, scalars) is replicated.
"""
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"


def key_name(key) -> str:
    """One step of a pytree key path as a string: a dict key, attribute name or index."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    return str(key)


def tree_names(tree):
    """The pytree of "/"-joined leaf names, e.g. ``"txt/Embed_0/embedding"``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(key_name(k) for k in path), tree)


def make_mesh(mesh_config: Sequence[tuple[str, int]], devices=None) -> Mesh:
    """Builds the device mesh of ``config.mesh``, with Auto axes (classic jit sharding).

    Args:
      mesh_config: ``[(axis_name, size), ...]``; at most one size may be -1, meaning all
        devices left over by the others.
      devices: defaults to all devices (of all processes). ``jax.make_mesh`` orders them
        so that the innermost axes stay within a host / fast interconnect.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    try:
        names, sizes = zip(*mesh_config)
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.mesh must be a list of (axis_name, size) pairs, got "
                         f"{mesh_config!r}") from e
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh repeats an axis name: {names}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes must be positive, with at most one -1: "
                         f"{mesh_config!r}")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % fixed:
            raise ValueError(f"config.mesh {mesh_config!r}: the fixed axis sizes (product {fixed}) "
                             f"do not divide the {n} devices")
        sizes[sizes.index(-1)] = n // fixed
    elif fixed != n:
        raise ValueError(f"config.mesh {mesh_config!r} has {fixed} devices but there are {n}; "
                         f"use -1 for one axis to take the rest")
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", np.shape(x)))


def _axis_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def _fsdp_spec(shape, mesh: Mesh) -> P:
    size = mesh.shape.get(FSDP_AXIS, 1)
    if size == 1:
        return P()
    for i in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[i] % size == 0:
            return P(*(None,) * i, FSDP_AXIS)
    return P()


def _explicit_spec(spec, shape, mesh: Mesh, name: str, regex: str) -> P:
    spec = tuple(spec)
    where = f"sharding rule ({regex!r}, {spec}) for parameter {name} of shape {shape}"
    if len(spec) > len(shape):
        raise ValueError(f"{where}: more entries than dimensions")
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in names if a not in mesh.shape]
        if unknown:
            raise ValueError(f"{where}: axes {unknown} are not in config.mesh {dict(mesh.shape)}")
        if dim % _axis_size(mesh, names):
            raise ValueError(f"{where}: dimension {dim} is not divisible by mesh axes "
                             f"{names} of size {_axis_size(mesh, names)}")
    return P(*spec)


def _check_rules(rules):
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"sharding rules must be (regex, strategy) pairs, got {rule!r}")
        strategy = rule[1]
        if isinstance(strategy, str) and strategy not in ("replicate", "fsdp"):
            raise ValueError(f"sharding rule {rule!r}: unknown strategy {strategy!r}; use "
                             f"'replicate', 'fsdp' or a PartitionSpec / tuple of axis names")


def spec_for(name: str, shape, mesh: Mesh, rules) -> P:
    """The PartitionSpec that the first rule matching ``name`` gives an array of ``shape``."""
    for regex, strategy in rules:
        if re.fullmatch(regex, name):
            if strategy == "replicate":
                return P()
            if strategy == "fsdp":
                return _fsdp_spec(shape, mesh)
            return _explicit_spec(strategy, shape, mesh, name, regex)
    return P()


def param_shardings(params, mesh: Mesh, rules):
    """A pytree of NamedSharding for ``params`` (arrays or ShapeDtypeStructs)."""
    _check_rules(rules)
    return jax.tree.map(lambda x, name: NamedSharding(mesh, spec_for(name, _shape(x), mesh, rules)),
                        params, tree_names(params))


def _trailing_dict_name(path) -> str | None:
    """The "/"-joined dict keys that end ``path``: a parameter name inside an optax state."""
    keys = []
    for k in reversed(path):
        if not isinstance(k, jax.tree_util.DictKey):
            break
        keys.append(str(k.key))
    return "/".join(reversed(keys)) if keys else None


def opt_state_shardings(opt_state, params, params_shardings, mesh: Mesh, rules=None):
    """Shardings for an optax state: params-shaped subtrees follow their parameter.

    A leaf named like a parameter and of its shape takes the parameter's sharding. One of
    another shape (adafactor's factored moments) takes the parameter's rule applied to its own
    shape when ``rules`` are given, else is replicated. All other leaves are replicated.
    """
    names = tree_names(params)
    by_name = dict(zip(jax.tree.leaves(names), zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(params_shardings))))
    if rules is not None:
        _check_rules(rules)

    def leaf_sharding(path, x):
        name = _trailing_dict_name(path)
        if name in by_name and _shape(x):
            param, param_sharding = by_name[name]
            if _shape(x) == _shape(param):
                return param_sharding
            if rules is not None:
                return NamedSharding(mesh, spec_for(name, _shape(x), mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def state_shardings(state: dict, mesh: Mesh, rules) -> dict:
    """Shardings for the train state ``{"params", "opt_state", ...}``; other entries replicated."""
    out = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    out["params"] = param_shardings(state["params"], mesh, rules)
    if "opt_state" in state:
        out["opt_state"] = opt_state_shardings(state["opt_state"], state["params"],
                                               out["params"], mesh, rules)
    return out


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: ``data`` and ``fsdp``, those the mesh has."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``batch_axes(mesh)``."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, P(axes) if axes else P())


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Global arrays from this process's slice of the batch (the same call on every process).

    Each process passes its own ``[B / process_count, ...]`` arrays; the global batch is
    their concatenation in process order, split over ``batch_sharding(mesh)``.
    """
    sharding = batch_sharding(mesh)
    n_shards = _axis_size(mesh, batch_axes(mesh))

    def put(x):
        x = np.asarray(x)
        global_b = x.shape[0] * jax.process_count()
        if global_b % n_shards:
            raise ValueError(f"config.batch_size: the global batch {global_b} is not divisible "
                             f"by the {n_shards} batch shards of the mesh {dict(mesh.shape)}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_batch)
