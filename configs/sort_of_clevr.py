r"""AiT on the generated Sort-of-CLEVR benchmark (docs/data.md#sort-of-clevr), binary relational questions.

Command:
  python -m ait_jax.data.prepare --dataset=sort_of_clevr --data_dir=$TFDS_DATA_DIR   # once
  python -m ait_jax.main --config=configs/sort_of_clevr.py:model=base --workdir=workdir/soc
Train on every question type with --config.question_types='("non_relational","binary","ternary")'.

75×75 images, patch 15 (25 tokens) plus the question token (docs/model.md#question-token), batch 64 as the paper,
trained on binary questions like the reference code. Wall time not yet measured.
Paper (docs/training.md#paper-results): AiT-Base binary relational 80.03; Relation Networks ≈ 89 relational, ≈ 99
non-relational.
"""
from ait_jax import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.dataset = 'sort_of_clevr'
  c.question_types = ('binary',)
  c.augment = False
  c.batch_size = 64
  c.eval_batch_size = 500
  c.model.preset = 'base'
  c.model.patch_size = 15
  c.model.bottleneck_k = 512
  return config_lib.apply_variant(c, arg)
