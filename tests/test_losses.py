"""vljax.losses: parity with open_clip and with references written from the papers, equality of
the sharded (shard_map over 2/4/8 CPU devices) and single-device forms, ring memory."""
import importlib.util
import inspect
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vljax import losses, objective
from vljax.losses import ascl, catlip, dcd, dexml, distill, dreamlip, partial_labels, queue
from vljax.losses import mixing as losses_mixing

B, D = 16, 8  # global batch divisible by 8 devices
RTOL, ATOL = 1e-5, 1e-6


def _normalised(rng, *shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def _mesh(n):
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=jax.devices()[:n])


def _sharded_value_and_grad(fn, args, specs, argnums, n):
    """value_and_grad of fn(*args, axis_name="data") run in shard_map on the first n devices."""
    mesh = _mesh(n)
    args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    f = jax.shard_map(lambda *a: fn(*a, axis_name="data"), mesh=mesh, in_specs=tuple(specs),
                      out_specs=P())
    return jax.jit(jax.value_and_grad(f, argnums=argnums))(*args)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return dict(zimg=_normalised(rng, B, D), ztxt=_normalised(rng, B, D),
                fimg=3 * rng.normal(size=(B, 5)).astype(np.float32),  # features: not normalised
                ftxt=rng.normal(size=(B, 6)).astype(np.float32),
                t=np.float32(4.0), b=np.float32(-2.5), rng=rng)


# ----------------------------------------------------------------------------- open_clip parity


@pytest.fixture(scope="module")
def open_clip_loss():
    """open_clip/loss.py loaded by path: the package __init__ needs torchvision; loss.py not."""
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss_ref", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def _torch_value_and_grads(loss_fn, *arrays):
    import torch
    tensors = [torch.tensor(np.asarray(a), dtype=torch.float32, requires_grad=True) for a in arrays]
    value = loss_fn(*tensors)
    value.backward()
    return value.item(), [x.grad.numpy() for x in tensors]


def test_softmax_matches_open_clip_clip_loss(data, open_clip_loss):
    ref_value, ref_grads = _torch_value_and_grads(
        open_clip_loss.ClipLoss(), data["zimg"], data["ztxt"], data["t"])
    value, grads = jax.value_and_grad(losses.softmax_contrastive, argnums=(0, 1, 2))(
        data["zimg"], data["ztxt"], data["t"])
    _close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        _close(g, r)


def test_sigmoid_matches_open_clip_siglip_loss(data, open_clip_loss):
    ref_value, ref_grads = _torch_value_and_grads(
        open_clip_loss.SigLipLoss(), data["zimg"], data["ztxt"], data["t"], data["b"])
    for impl in ("all_gather", "ring"):  # on one device both are the plain block
        value, grads = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))(
            data["zimg"], data["ztxt"], data["t"], data["b"], impl=impl)
        _close(value, ref_value)
        for g, r in zip(grads, ref_grads):
            _close(g, r)


def test_sigmoid_normalisation_relative_to_open_clip_per_rank_losses(data, open_clip_loss):
    """open_clip's SigLipLoss on rank r of n sums its b local images against all B texts and
    divides by b; DDP averages over ranks. The mean of those per-rank losses is our global loss.
    The per-rank values are built with SigLipLoss._loss exactly as its 'shift' ring does."""
    n = 4
    nb = B // n
    ref = open_clip_loss.SigLipLoss(rank=0, world_size=1)

    def per_rank_mean(zimg, ztxt, t, b):
        total = 0.0
        for r in range(n):
            img_r = zimg[r * nb:(r + 1) * nb]
            loss_r = ref._loss(img_r, ztxt[r * nb:(r + 1) * nb], t, b)
            for s in range(n):
                if s != r:
                    loss_r = loss_r + ref._loss(img_r, ztxt[s * nb:(s + 1) * nb], t, b,
                                                negative_only=True)
            total = total + loss_r
        return total / n

    ref_value, ref_grads = _torch_value_and_grads(
        per_rank_mean, data["zimg"], data["ztxt"], data["t"], data["b"])
    value, grads = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))(
        data["zimg"], data["ztxt"], data["t"], data["b"])
    _close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        _close(g, r)


# ----------------------------------------------------------------------------- paper references


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def ref_dcl(zimg, ztxt, t, sigma=None):
    """Yeh et al. 2022, cross-modal: -w_i s_ii + log sum_{j != i} exp(s_ij), both directions;
    w_i = 1 (DCL, Eq. 6) or the vMF weight 2 - exp(<z_i, z_i+>/sigma) / mean_k exp(<z_k, z_k+>/sigma)
    (DCLW, Eq. 7)."""
    zimg, ztxt = zimg.astype(np.float64), ztxt.astype(np.float64)
    n = len(zimg)
    cos = np.array([zimg[i] @ ztxt[i] for i in range(n)])
    w = np.ones(n) if sigma is None else 2 - np.exp(cos / sigma) / np.mean(np.exp(cos / sigma))
    total = 0.0
    for s in (t * zimg @ ztxt.T, t * ztxt @ zimg.T):
        for i in range(n):
            neg = [s[i, j] for j in range(n) if j != i]
            total += -w[i] * s[i, i] + np.log(np.sum(np.exp(neg)))
    return total / (2 * n)


def ref_cwcl(zimg, ztxt, t, fimg, ftxt, ref_modality="image", symmetric=False):
    """Srinivasa et al. 2023, Eq. 2-3, with U the frozen (reference) modality and u_i its own
    features of input i, normalised:
    L_{U->V} = -1/N sum_i 1/(sum_j w_ij) sum_j w_ij log softmax_j(<p_i, q_j> / tau),
    w_ij = <u_i, u_j>/2 + 1/2."""
    zimg, ztxt = zimg.astype(np.float64), ztxt.astype(np.float64)
    zref = (fimg if ref_modality == "image" else ftxt).astype(np.float64)
    zref = zref / np.linalg.norm(zref, axis=1, keepdims=True)
    p, q = (zimg, ztxt) if ref_modality == "image" else (ztxt, zimg)
    n = len(p)
    w = np.array([[0.5 * zref[i] @ zref[j] + 0.5 for j in range(n)] for i in range(n)])

    def one_way(anchor, cand):
        total = 0.0
        for i in range(n):
            logits = np.array([t * anchor[i] @ cand[j] for j in range(n)])
            logp = logits - np.log(np.sum(np.exp(logits)))
            total += -np.sum(w[i] * logp) / np.sum(w[i])
        return total / n

    if symmetric:
        return (one_way(p, q) + one_way(q, p)) / 2
    return one_way(p, q)


def ref_multi_positive(zimg, ztxt, t, weights):
    """UniCL / soft-target contrastive loss from its equations: q_ii = 1, q_ij = weights_ij,
    p = q / row sums; (sum_i -sum_j p_ij log softmax_j(t zimg_i.ztxt_j) + the same with the
    modalities swapped and q^T) / 2B."""
    zimg, ztxt = zimg.astype(np.float64), ztxt.astype(np.float64)
    q = np.asarray(weights, np.float64).copy()
    np.fill_diagonal(q, 1.0)
    total = 0.0
    for logits, m in ((t * zimg @ ztxt.T, q), (t * ztxt @ zimg.T, q.T)):
        logp = _log_softmax(logits)
        p = m / m.sum(axis=1, keepdims=True)
        total += -np.sum(p * logp)
    return total / (2 * len(zimg))


def ref_weights(positives, labels, min_overlap=1.0, weighting="uniform"):
    """w_ij of each `loss.positives` mode, element by element from its definition."""
    n = len(labels)
    w = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if positives == "labels":
                w[i, j] = float(labels[i] == labels[j] and labels[i] >= 0)
            elif positives == "captions":
                w[i, j] = float(list(labels[i]) == list(labels[j]))
            else:
                a, c = set(np.flatnonzero(labels[i])), set(np.flatnonzero(labels[j]))
                jac = len(a & c) / len(a | c) if a | c else 0.0
                w[i, j] = (jac if weighting == "jaccard" else 1.0) if a | c and jac >= min_overlap else 0.0
    return w


def ref_filip_similarity(img, txt, txt_mask, img_mask):
    img, txt = img.astype(np.float64), txt.astype(np.float64)
    i2t = np.zeros((len(img), len(txt)))
    t2i = np.zeros((len(img), len(txt)))
    for bi, ci in itertools.product(range(len(img)), range(len(txt))):
        vi = img[bi][img_mask[bi]]  # valid image tokens [n, D]
        vt = txt[ci][txt_mask[ci]]  # valid text tokens [m, D]
        s = vi @ vt.T
        i2t[bi, ci] = np.mean([s[k].max() for k in range(len(vi))])
        t2i[bi, ci] = np.mean([s[:, k].max() for k in range(len(vt))])
    return i2t, t2i


def ref_filip_loss(img, txt, txt_mask, img_mask, t):
    i2t, t2i = ref_filip_similarity(img, txt, txt_mask, img_mask)
    ce = lambda logits: -np.mean(np.diag(_log_softmax(logits)))  # noqa: E731
    return (ce(t * i2t) + ce(t * t2i.T)) / 2


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(1)
    img = _normalised(rng, B, 3, D)
    txt = _normalised(rng, B, 4, D)
    txt_mask = rng.random((B, 4)) < 0.6
    txt_mask[:, 0] = True  # every caption has at least one token
    img_mask = rng.random((B, 3)) < 0.7
    img_mask[:, 0] = True
    return dict(img=img, txt=txt, txt_mask=txt_mask, img_mask=img_mask)


def test_dcl_matches_paper_reference(data):
    value = losses.dcl_loss(data["zimg"], data["ztxt"], data["t"])
    _close(value, ref_dcl(data["zimg"], data["ztxt"], data["t"]))


def test_dclw_matches_paper_reference(data):
    value = losses.dclw_loss(data["zimg"], data["ztxt"], data["t"], sigma=0.5)
    _close(value, ref_dcl(data["zimg"], data["ztxt"], data["t"], sigma=0.5))
    assert abs(float(value) - float(losses.dcl_loss(data["zimg"], data["ztxt"], data["t"]))) > 1e-3


def test_alignment_and_uniformity_match_paper_reference(data):
    """Wang & Isola 2020: align = E ||x - y||^2, uniform = log mean_{i<j} exp(-2 ||x_i - x_j||^2)."""
    zi, zt = data["zimg"].astype(np.float64), data["ztxt"].astype(np.float64)
    _close(losses.alignment_loss(data["zimg"], data["ztxt"]), np.mean(np.sum((zi - zt) ** 2, axis=1)))
    pd = [np.sum((zi[i] - zi[j]) ** 2) for i in range(B) for j in range(i + 1, B)]
    _close(losses.uniformity_loss(data["zimg"]), np.log(np.mean(np.exp(-2.0 * np.array(pd)))))


def test_regularisers_add_their_weighted_terms(data):
    zi, zt, t = data["zimg"], data["ztxt"], data["t"]
    spec = objective.with_regularisers(objective.LOSSES["softmax"], align_weight=0.5, uniform_weight=0.25)
    assert spec.inputs == ("zimg", "ztxt", "t", "zimg", "ztxt")
    expected = (losses.softmax_contrastive(zi, zt, t) + 0.5 * losses.alignment_loss(zi, zt)
                + 0.25 * (losses.uniformity_loss(zi) + losses.uniformity_loss(zt)) / 2)
    _close(spec.fn(zi, zt, t, zi, zt), expected)
    assert objective.with_regularisers(objective.LOSSES["softmax"]) is objective.LOSSES["softmax"]


@pytest.mark.parametrize("ref_modality", ["image", "text"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_cwcl_matches_paper_reference(data, ref_modality, symmetric):
    feats = data["fimg"], data["ftxt"]
    value = losses.cwcl_loss(data["zimg"], data["ztxt"], data["t"], *feats,
                             ref_modality=ref_modality, symmetric=symmetric)
    _close(value, ref_cwcl(data["zimg"], data["ztxt"], data["t"], *feats, ref_modality, symmetric))


def test_cwcl_direction_matters(data):
    """The two directions differ, so the docstring's choice of direction is a real one."""
    one = losses.cwcl_loss(data["zimg"], data["ztxt"], data["t"], data["fimg"], data["ftxt"])
    other = losses.cwcl_loss(data["zimg"], data["ztxt"], data["t"], data["fimg"], data["ftxt"],
                             ref_modality="text")
    assert abs(float(one) - float(other)) > 1e-3


def _label_sets(rng, n=B, k=6):
    """Multi-hot [n, k] label sets with repeats, overlaps and two empty sets (unlabeled)."""
    sets = (rng.random((5, k)) < 0.35)[rng.integers(0, 5, size=n)].copy()
    sets[rng.random((n, k)) < 0.1] ^= True
    sets[:2] = False
    return sets


def _captions(rng, n=B, length=5):
    """Token ids [n, L] with duplicate captions (4 distinct ones)."""
    return rng.integers(0, 50, size=(4, length)).astype(np.int32)[rng.integers(0, 4, size=n)]


MULTI_POSITIVE_MODES = [
    ("labels", {}), ("captions", {}), ("label_sets", {}), ("label_sets", dict(min_overlap=0.5)),
    ("label_sets", dict(min_overlap=1e-6)), ("label_sets", dict(min_overlap=1e-6, weighting="jaccard")),
    ("label_sets", dict(min_overlap=0.4, weighting="jaccard"))]


@pytest.mark.parametrize("positives,options", MULTI_POSITIVE_MODES)
def test_multi_positive_matches_reference(positives, options, data):
    rng = np.random.default_rng(2)
    labels = {"labels": np.where(rng.random(B) < 0.2, -1, rng.integers(0, 4, size=B)),
              "captions": _captions(rng), "label_sets": _label_sets(rng)}[positives]
    w = ref_weights(positives, labels, **options)
    assert w.sum() > np.trace(w)  # some rows have positives besides themselves
    value = losses.multi_positive_contrastive(data["zimg"], data["ztxt"], data["t"], labels,
                                              positives=positives, **options)
    _close(value, ref_multi_positive(data["zimg"], data["ztxt"], data["t"], w))


def test_multi_positive_label_set_options_differ(data):
    """Equal sets, overlapping sets and Jaccard weights are three different targets here."""
    sets = _label_sets(np.random.default_rng(2))
    values = [float(losses.multi_positive_contrastive(data["zimg"], data["ztxt"], data["t"], sets,
                                                      positives="label_sets", **o))
              for o in (dict(), dict(min_overlap=1e-6), dict(min_overlap=1e-6, weighting="jaccard"))]
    assert min(abs(a - b) for a, b in itertools.combinations(values, 2)) > 1e-3, values


def test_multi_positive_unlabeled_records_are_not_positives(data):
    """Label -1 (or an empty label set) is no label: those records pair only with themselves."""
    zi, zt, t = data["zimg"], data["ztxt"], data["t"]
    ids = np.full(B, -1)
    ids[:2] = 3  # two records share a label; the rest are unlabeled
    mask = np.zeros((B, B), bool)
    mask[:2, :2] = True
    _close(losses.multi_positive_contrastive(zi, zt, t, ids), ref_multi_positive(zi, zt, t, mask))
    sets = np.zeros((B, 4), bool)
    sets[:2, 1] = True
    for options in (dict(), dict(min_overlap=1e-6, weighting="jaccard")):
        _close(losses.multi_positive_contrastive(zi, zt, t, sets, positives="label_sets", **options),
               ref_multi_positive(zi, zt, t, mask))


def test_multi_positive_with_unique_ids_is_clip(data):
    value = losses.multi_positive_contrastive(data["zimg"], data["ztxt"], data["t"], np.arange(B))
    _close(value, losses.softmax_contrastive(data["zimg"], data["ztxt"], data["t"]))


def test_filip_similarity_and_loss_match_reference(tokens, data):
    i2t, t2i = losses.filip_similarity(tokens["img"], tokens["txt"], tokens["txt_mask"],
                                       tokens["img_mask"])
    ref_i2t, ref_t2i = ref_filip_similarity(tokens["img"], tokens["txt"], tokens["txt_mask"],
                                            tokens["img_mask"])
    assert i2t.shape == t2i.shape == (B, B)
    _close(i2t, ref_i2t)
    _close(t2i, ref_t2i)
    value = losses.filip_loss(tokens["img"], tokens["txt"], tokens["txt_mask"], data["t"],
                              img_mask=tokens["img_mask"])
    _close(value, ref_filip_loss(tokens["img"], tokens["txt"], tokens["txt_mask"],
                                 tokens["img_mask"], data["t"]))


def test_filip_with_one_token_is_clip(data):
    value = losses.filip_loss(data["zimg"][:, None], data["ztxt"][:, None], None, data["t"])
    _close(value, losses.softmax_contrastive(data["zimg"], data["ztxt"], data["t"]))


# ----------------------------------------------------------------------------- sharded == single


def _cases(data, tokens):
    """name -> (fn(*args, axis_name=None), args, in_specs, argnums to differentiate)."""
    rng = np.random.default_rng(3)
    bs, rep = P("data"), P()
    zi, zt, t, b = data["zimg"], data["ztxt"], data["t"], data["b"]
    return {
        "softmax": (losses.softmax_contrastive, (zi, zt, t), (bs, bs, rep), (0, 1, 2)),
        "softmax_ring": (lambda *a, axis_name=None: losses.softmax_contrastive(
            *a, axis_name=axis_name, impl="ring"), (zi, zt, t), (bs, bs, rep), (0, 1, 2)),
        "sigmoid": (losses.sigmoid_loss, (zi, zt, t, b), (bs, bs, rep, rep), (0, 1, 2, 3)),
        "sigmoid_ring": (lambda *a, axis_name=None: losses.sigmoid_loss(
            *a, axis_name=axis_name, impl="ring"), (zi, zt, t, b), (bs, bs, rep, rep),
            (0, 1, 2, 3)),
        "dcl": (losses.dcl_loss, (zi, zt, t), (bs, bs, rep), (0, 1, 2)),
        "dclw": (losses.dclw_loss, (zi, zt, t), (bs, bs, rep), (0, 1, 2)),
        "align_uniform": (objective.with_regularisers(objective.LOSSES["dcl"], 0.5, 0.5).fn,
                          (zi, zt, t, zi, zt), (bs, bs, rep, bs, bs), (0, 1, 2)),
        "cwcl": (lambda *a, axis_name=None: losses.cwcl_loss(
            *a, axis_name=axis_name, symmetric=True), (zi, zt, t, data["fimg"], data["ftxt"]),
            (bs, bs, rep, bs, bs), (0, 1, 2)),
        **{f"multi_positive_{mode}": (
            lambda zi, zt, t, y, axis_name=None, mode=mode, o=o: losses.multi_positive_contrastive(
                zi, zt, t, y, axis_name=axis_name, positives=mode, **o),
            (zi, zt, t, y), (bs, bs, rep, bs), (0, 1, 2))
           for mode, y, o in (("labels", rng.integers(-1, 5, size=B), {}), ("captions", _captions(rng), {}),
                              ("label_sets", _label_sets(rng), dict(min_overlap=0.3, weighting="jaccard")))},
        "filip": (lambda it, tt, tm, t, im, axis_name=None: losses.filip_loss(
            it, tt, tm, t, axis_name=axis_name, img_mask=im),
            (tokens["img"], tokens["txt"], tokens["txt_mask"], t, tokens["img_mask"]),
            (bs, bs, bs, rep, bs), (0, 1, 3)),
    }


CASES = ["softmax", "softmax_ring", "sigmoid", "sigmoid_ring", "dcl", "dclw", "align_uniform", "cwcl", "multi_positive_labels",
         "multi_positive_captions", "multi_positive_label_sets", "filip"]


@pytest.mark.parametrize("name", CASES)
def test_sharded_equals_single_device_on_8_devices(name, data, tokens):
    fn, args, specs, argnums = _cases(data, tokens)[name]
    value, grads = _sharded_value_and_grad(fn, args, specs, argnums, n=8)
    ref_value, ref_grads = jax.value_and_grad(fn, argnums=argnums)(*args)
    _close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        _close(g, r)


def _ring_case(loss, impl, data):
    """(fn(*args, axis_name), args, in_specs, argnums) of the sigmoid or softmax loss."""
    zi, zt, t = data["zimg"], data["ztxt"], data["t"]
    if loss == "sigmoid":
        return (lambda *a, axis_name: losses.sigmoid_loss(*a, axis_name=axis_name, impl=impl),
                (zi, zt, t, data["b"]), (P("data"), P("data"), P(), P()), (0, 1, 2, 3))
    return (lambda *a, axis_name: losses.softmax_contrastive(*a, axis_name=axis_name, impl=impl),
            (zi, zt, t), (P("data"), P("data"), P()), (0, 1, 2))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ring_equals_all_gather(loss, n, data):
    (v_ag, g_ag), (v_ring, g_ring) = [
        _sharded_value_and_grad(*_ring_case(loss, impl, data), n)
        for impl in ("all_gather", "ring")]
    _close(v_ring, v_ag)
    for g, r in zip(g_ring, g_ag):
        _close(g, r)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_ring_over_two_mesh_axes_equals_single_device(loss, data):
    """The batch split over ("data", "fsdp") of a 2 x 4 mesh, as the trainer does with FSDP."""
    fn, args, specs, argnums = _ring_case(loss, "ring", data)
    axes = ("data", "fsdp")
    mesh = jax.make_mesh((2, 4), axes, axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    specs = tuple(P(axes) if s == P("data") else s for s in specs)
    f = jax.shard_map(lambda *a: fn(*a, axis_name=axes), mesh=mesh, in_specs=specs,
                      out_specs=P())
    value, grads = jax.jit(jax.value_and_grad(f, argnums=argnums))(
        *[jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)])
    ref_value, ref_grads = jax.value_and_grad(lambda *a: fn(*a, axis_name=None),
                                              argnums=argnums)(*args)
    _close(value, ref_value)
    for g, r in zip(grads, ref_grads):
        _close(g, r)


def test_ring_softmax_is_stable_at_large_logit_scale():
    """The online log-sum-exp must not overflow where exp(logits) would (t = 100, logits 100)."""
    rng = np.random.default_rng(5)
    data = dict(zimg=_normalised(rng, B, D), t=np.float32(100.0))
    data["ztxt"] = data["zimg"].copy()  # positives at the maximum logit t
    (v_ag, g_ag), (v_ring, g_ring) = [
        _sharded_value_and_grad(*_ring_case("softmax", impl, data), 4)
        for impl in ("all_gather", "ring")]
    assert np.isfinite(v_ring) and all(np.all(np.isfinite(g)) for g in g_ring)
    _close(v_ring, v_ag)
    for g, r in zip(g_ring, g_ag):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- memory


def _temp_bytes(loss, impl, n, b=512, width=512):
    mesh = _mesh(n)

    def sds(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))

    fn, _, specs, argnums = _ring_case(loss, impl, dict(zimg=0, ztxt=0, t=0, b=0))
    shapes = [(n * b, width) if s == P("data") else () for s in specs]
    f = jax.shard_map(lambda *a: fn(*a, axis_name="data"), mesh=mesh, in_specs=specs,
                      out_specs=P())
    compiled = jax.jit(jax.value_and_grad(f, argnums=argnums)).lower(
        *[sds(shape, s) for shape, s in zip(shapes, specs)]).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_ring_memory_is_flat_in_device_count(loss):
    ring = {n: _temp_bytes(loss, "ring", n) for n in (2, 4, 8)}
    all_gather_8 = _temp_bytes(loss, "all_gather", 8)
    assert ring[8] <= 1.25 * ring[2], ring
    assert ring[4] <= 1.25 * ring[2], ring
    assert ring[8] <= all_gather_8 / 4, (ring, all_gather_8)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(data):
    zi, zt, t, b = data["zimg"], data["ztxt"], data["t"], data["b"]
    with pytest.raises(ValueError, match="same shape"):
        losses.softmax_contrastive(zi, zt[:4], t)
    with pytest.raises(ValueError, match="t must be a scalar"):
        losses.softmax_contrastive(zi, zt, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="impl"):
        losses.sigmoid_loss(zi, zt, t, b, impl="bidir")
    with pytest.raises(ValueError, match="impl"):
        losses.softmax_contrastive(zi, zt, t, impl="gather")
    with pytest.raises(ValueError, match=r"\[B\] with B = 16 for positives='labels'"):
        losses.multi_positive_contrastive(zi, zt, t, np.ones((B, 3), bool))
    with pytest.raises(ValueError, match="`loss.positives`"):
        losses.multi_positive_contrastive(zi, zt, t, np.ones(B, int), positives="tags")
    with pytest.raises(ValueError, match="`loss.min_overlap`"):
        losses.multi_positive_contrastive(zi, zt, t, np.ones((B, 3), bool), positives="label_sets",
                                          min_overlap=0.0)
    with pytest.raises(ValueError, match="`loss.min_overlap` / `loss.weighting`"):
        losses.multi_positive_contrastive(zi, zt, t, np.ones(B, int), weighting="jaccard")
    with pytest.raises(ValueError, match="image features"):
        losses.cwcl_loss(zi, zt, t, data["fimg"][:3], data["ftxt"])
    with pytest.raises(ValueError, match="at least 2"):
        losses.dcl_loss(zi[:1], zt[:1], t)
    with pytest.raises(ValueError, match="widths"):
        losses.filip_similarity(zi[:, None], np.ones((B, 2, D + 1), np.float32))


def test_losses_registry():
    assert {k: v.fn for k, v in objective.LOSSES.items()} == {
        "softmax": losses.softmax_contrastive, "sigmoid": losses.sigmoid_loss,
        "dcl": losses.dcl_loss, "dclw": losses.dclw_loss, "cwcl": losses.cwcl_loss,
        "multi_positive": losses.multi_positive_contrastive, "filip": losses.filip_loss,
        "multilabel": losses.multilabel_loss, "caption": losses.caption_loss,
        "sigmoid_caption": losses.sigmoid_caption_loss, "sigmoid_locca": losses.sigmoid_caption_loss,
        "hard_negative_softmax": losses.hard_negative_softmax, "hard_negative_sigmoid": losses.hard_negative_sigmoid,
        "pu_mlc": partial_labels.pu_mlc_loss, "nnpu": partial_labels.nnpu_loss, "dexml": dexml.dexml_loss,
        "comic": partial_labels.comic_loss, "clip_kd": distill.clip_kd, "dcd": dcd.dcd_loss,
        "catlip": catlip.catlip_loss, "queue_contrastive": queue.queue_contrastive,
        "ascl": ascl.ascl_loss, "dreamlip": dreamlip.dreamlip_loss, "mix_softmax": losses_mixing.mix_softmax}
    # Every declared input is a positional parameter of the function, in order.
    for name, loss in objective.LOSSES.items():
        params = list(inspect.signature(loss.fn).parameters)
        assert len(loss.inputs) <= len(params) and "axis_name" in params, name
