r"""AiT on the generated Triangle benchmark (docs/data.md#triangle): is the triangle equilateral?

Command (the first run generates the dataset into data_dir, no download):
  python -m ait_jax.main --config=configs/triangle.py --workdir=workdir/triangle
CPU smoke run: --config=configs/triangle.py:quick --config.data_dir=data (a narrow 1-layer model,
60 steps; its wall time on a 2-core CPU is in README.md, "One command"): test accuracy 56.7% on
the 10,000 test images (chance 50%), with the reference initialisation (56.2% with the earlier
Xavier one); `quick` trains on the stored split, the full config on fresh triangles every epoch.

64×64 images, patch 32 (4 tokens), k = 64 over the batch's tokens, AiT-Small. The paper gives
no batch size for Triangle; we use 256 and the reference optimizer. GPU wall time not yet
measured.
Paper top-1 (docs/training.md#paper-results): AiT-Base 99.64, AiT-Medium 99.57, ViT-Base 99.63, ViT-Medium 99.62.
"""
from ait_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.dataset = 'triangle'
  c.augment = False
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.model.preset = 'small'
  c.model.patch_size = 32
  c.model.bottleneck_k = 64
  # Fresh triangles every epoch, as the published code draws them (docs/data.md#fresh); the test
  # split stays the stored one. `quick` (60 steps, less than an epoch: every image is new either
  # way) trains on the stored split, the data path its tests exercise.
  c.fresh_train_data = True
  c = config_lib.apply_variant(c, arg)
  if config_lib.parse_arg(arg, model='', ablation='', quick=False).quick:
    c.fresh_train_data = False
  return c
