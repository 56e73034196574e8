"""Position-embedding resampling, to run a checkpoint at another image resolution."""
import numpy as np

from vljax.models.posemb import resize_grid


def resample_posemb(posemb: np.ndarray, new_grid: tuple[int, int], num_prefix_tokens: int = 0,
                    old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinearly resamples a learned 2-D position embedding to a new patch grid.

    posemb: [1, P + h * w, D] or [P + h * w, D], the first P = num_prefix_tokens rows (class /
      register tokens, e.g. CLIP's class position) kept as they are; the grid rows are row-major.
    new_grid: (h', w'); old_grid: (h, w), by default the square that fits.
    Returns the same rank as the input: [1, P + h' * w', D] or [P + h' * w', D].
    vljax ViTs hold no prefix rows (num_prefix_tokens=0); set it for CLIP-layout arrays.
    """
    posemb = np.asarray(posemb)
    batched = posemb.ndim == 3
    if batched:
        if posemb.shape[0] != 1:
            raise ValueError(f"posemb must be [1, N, D] or [N, D], got shape {posemb.shape}")
        posemb = posemb[0]
    if posemb.ndim != 2:
        raise ValueError(f"posemb must be [1, N, D] or [N, D], got shape {posemb.shape}")
    prefix, grid = posemb[:num_prefix_tokens], posemb[num_prefix_tokens:]
    n = grid.shape[0]
    if old_grid is None:
        side = int(round(np.sqrt(n)))
        if side * side != n:
            raise ValueError(f"posemb has {n} grid rows (after {num_prefix_tokens} prefix "
                             "tokens): not a square, pass old_grid=(h, w)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"old_grid {tuple(old_grid)} does not match the {n} grid rows of posemb")
    h, w = new_grid
    if h < 1 or w < 1:
        raise ValueError(f"new_grid must be positive, got {tuple(new_grid)}")
    x = grid.reshape(*old_grid, -1).astype(np.float64)
    x = resize_grid(x, (h, w))
    out = np.concatenate([prefix, x.reshape(h * w, -1).astype(posemb.dtype)], axis=0)
    return out[None] if batched else out
