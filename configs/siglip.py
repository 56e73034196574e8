r"""SigLIP: the CLIP recipe with the sigmoid loss (ring form: memory flat in the device count).

    python -m vljax.main --config=configs/siglip.py --workdir=/tmp/vljax_siglip

Expected runtime on a 2-core CPU with the default tiny towers: about 3-4 minutes (300 steps, batch 64).
Differences from configs/clip.py, as in Zhai et al. 2023: sigmoid loss with learned bias (init -10)
and temperature (init log 10), MAP-head image pooling, bidirectional text tower pooled at the last token,
`loss.impl="ring"` (text chunks travel around the data axis; per-device memory O(b^2)).

At scale: `--config=configs/siglip.py:img=B/16,txt=B,size=224,batch=32768`, TFDS data as in clip.py.
"""
import importlib.util
import os

# Config files are loaded by path (ml_collections), so the sibling is loaded the same way.
_spec = importlib.util.spec_from_file_location("vljax_configs_clip", os.path.join(os.path.dirname(__file__), "clip.py"))
clip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clip)


def get_config(arg=None):
    c = clip.get_config(arg)
    c.model.image.pool_type = "map"
    c.model.image.ln_pre = False
    c.model.image.patch_bias = True
    c.model.image.act = "gelu_tanh"
    c.model.image.ln_eps = 1e-6
    c.model.image.head_bias = True
    c.model.text.causal = False
    c.model.text.pool_type = "last"
    c.model.text.act = "gelu_tanh"
    c.model.text.ln_eps = 1e-6
    c.model.text.head_bias = True
    c.model.temperature_init = 10.0
    c.model.bias_init = -10.0
    c.loss = dict(name="sigmoid", impl="ring")
    c.optax.b2 = 0.95
    return c
