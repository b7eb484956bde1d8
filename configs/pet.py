r"""AiT on Oxford-IIIT Pet (37 breeds), batch 128 and M = 128 memory slots as the paper
(docs/training.md#configs).

Command (the first run downloads images.tar.gz and annotations.tar.gz, 774 MiB, into
config.data_dir and builds the dataset; docs/data.md#preparation):
  python -m ait_jax.main --config=configs/pet.py --workdir=workdir/pet

The JPEGs are decoded and resized to 224x224 on the host as they are read (see
ait_jax/data/input_pipeline.py); patch 16 gives 196 tokens. docs/training.md lists no Pet
accuracy from the paper; wall time not yet measured.
"""
from ait_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.dataset = 'oxford_iiit_pet'
  c.batch_size = 128  # the paper's Pet batch
  c.eval_batch_size = 256
  c.model.preset = 'small'
  c.model.patch_size = 16
  c.model.memory_slots = 128  # the paper's M for Pet
  c.model.bottleneck_k = 512
  return config_lib.apply_variant(c, arg)
