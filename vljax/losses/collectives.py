"""Cross-device helpers: the axis a batch is split over, gathers and sums whose transposes
return every gradient to its owner, and the ring that passes text chunks around the axis with
`lax.ppermute` (per-device memory O(b^2) at any device count)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from vljax.losses.common import pair_logits


def axis_info(axis_name):
    """(index of this device along the axis, number of devices); (0, 1) without an axis."""
    if axis_name is None:
        return 0, 1
    return lax.axis_index(axis_name), lax.axis_size(axis_name)


def gather(x, axis_name):
    """Per-device shard `[b, ...]` -> global batch `[B, ...]` (device order).

    Differentiable: the transpose of all_gather is psum_scatter, so every device's gradient
    for a gathered row is summed on the device that owns it, exactly as on one device.
    """
    if axis_name is None:
        return x
    return lax.all_gather(x, axis_name, axis=0, tiled=True)


def psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


def varying(x, axis_name):
    """Marks a replicated value as per-device (a no-op when it already is one).

    Needed where a value enters a custom_vjp that returns a per-device cotangent for it; the
    transpose of this cast is the psum that makes the gradient replicated again.
    """
    if axis_name in jax.typeof(x).manual_axis_type.varying:
        return x
    return lax.pcast(x, axis_name, to="varying")


# ----------------------------------------------------------------------------- ring


def ring_perm(n):
    return [(j, (j + 1) % n) for j in range(n)]


def ring(axis_name, step, travel, home, local):
    """Runs `step` on every (local images, travelling text chunk) block of the ring.

    At hop k (0 .. n-1) the device holds the text shard of device (idx - k) mod n, passed one
    step to the right each hop. `travel` (the chunk and data read with it) and `home` (the
    chunk's accumulators: every device adds its images' share) move together; `local` stays.
    `step(travel, home, local) -> (home, local)`. After n - 1 hops a chunk sits one step short
    of its owner with the shares of all n devices, and one more hop of `home` alone delivers
    it. Only one block exists at a time: memory O(b^2) at any device count.

    Returns (home, local), `home` being this device's own chunk's accumulators.
    """
    n = lax.axis_size(axis_name)
    perm = ring_perm(n)
    home, local = step(travel, home, local)

    def body(_, carry):
        travel, home, local = carry
        travel, home = lax.ppermute((travel, home), axis_name, perm)
        home, local = step(travel, home, local)
        return travel, home, local

    _, home, local = lax.fori_loop(1, n, body, (travel, home, local))
    if n > 1 and jax.tree.leaves(home):
        home = lax.ppermute(home, axis_name, perm)
    return home, local


def block_grads(zimg, chunk, t, g):
    """Gradients through x = t * zimg @ chunk.T (+ b) given g = d loss / d x: [b_img, b_chunk].

    -> (dzimg = t g @ chunk, dchunk = t g.T @ zimg, dt = sum(g * S)), float32. dt is taken as
    sum(zimg * (g @ chunk)) so that S need not outlive g.
    """
    g_chunk = jnp.einsum("nm,md->nd", g.astype(chunk.dtype), chunk,
                         preferred_element_type=jnp.float32)  # [b_img, D]
    g_img = jnp.einsum("nm,nd->md", g.astype(zimg.dtype), zimg,
                       preferred_element_type=jnp.float32)  # [b_chunk, D]
    return t * g_chunk, t * g_img, jnp.sum(zimg.astype(jnp.float32) * g_chunk)


def positives_grads(zimg, ztxt, t, weight):
    """Gradients of -weight * sum_i t <zimg_i, ztxt_i>: (dzimg, dztxt, dt)."""
    return (-weight * t * ztxt.astype(jnp.float32), -weight * t * zimg.astype(jnp.float32),
            -weight * jnp.sum(pair_logits(zimg, ztxt)))


def ring_cotangents(zimg, ztxt, t, dzimg, dztxt, dt):
    return (dzimg.astype(zimg.dtype), dztxt.astype(ztxt.dtype), dt.astype(jnp.result_type(t)))

