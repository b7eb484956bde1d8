r"""AiT on CIFAR-10 with the reference recipe (docs/training.md#recipe): AdamW 1e-4, batch 512, 100 epochs.

Command (the first run downloads cifar-10-binary.tar.gz, 162 MiB, into
config.data_dir and builds the dataset; docs/data.md#preparation):
  python -m ait_jax.main --config=configs/cifar10.py:model=base --workdir=workdir/cifar10_base

Variants (after the colon, comma separated): model=small|medium|base|large|vit_base|...,
ablation=no_bottleneck|no_self_attention|no_hopfield|no_balance_loss|memory_reset|no_memory,
quick (a CPU smoke run). Sized for one H200 or a TPU v4-8; wall time not yet measured here.
Paper top-1 (docs/training.md#paper-results): AiT-Base 85.44, AiT-Medium 84.59, ViT-Base 83.82, ViT-Medium 82.41.
"""
from ait_jax import config_lib


def get_config(arg=None):
  return config_lib.apply_variant(config_lib.cifar_config('cifar10'), arg)
