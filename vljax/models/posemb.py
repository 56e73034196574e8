"""Position-embedding resizing for the towers (a learned grid run at another patch grid) and for
converters (`vljax.convert.posemb.resample_posemb`): bilinear, corners aligned."""
import numpy as np


def _linear_resize_axis(x, new: int, axis: int, xp=np):
    """Linear interpolation along `axis` with the end points aligned (scipy.ndimage.zoom order=1,
    as big_vision's resample_posemb): output i samples input i * (old - 1) / (new - 1).
    `xp`: the array module of x (numpy, or jax.numpy inside a traced model)."""
    old = x.shape[axis]
    if new == old:
        return x
    if old == 1:
        return xp.repeat(x, new, axis=axis)
    pos = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, old - 2)
    frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    if xp is not np:  # inside a traced model: the model's dtype (numpy keeps float64, exact)
        frac = frac.astype(x.dtype)
    a, b = xp.take(x, lo, axis=axis), xp.take(x, lo + 1, axis=axis)
    return a * (1 - frac) + b * frac


def resize_grid(grid, new_grid: tuple[int, int], xp=np):
    """[h, w, D] -> [h', w', D], bilinear with aligned corners (`_linear_resize_axis` twice)."""
    return _linear_resize_axis(_linear_resize_axis(grid, new_grid[0], 0, xp), new_grid[1], 1, xp)
