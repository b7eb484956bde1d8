r"""AiT on CIFAR-100 with the reference recipe (docs/training.md#recipe): AdamW 1e-4, batch 512, 100 epochs.

Command (the first run downloads cifar-100-binary.tar.gz, 161 MiB, into
config.data_dir and builds the dataset; docs/data.md#preparation):
  python -m ait_jax.main --config=configs/cifar100.py:model=base --workdir=workdir/cifar100_base

Variants (after the colon, comma separated): model=small|medium|base|large|vit_base|...,
ablation=no_bottleneck|no_self_attention|no_hopfield|no_balance_loss|memory_reset|no_memory,
quick (a CPU smoke run). Sized for one H200 or a TPU v4-8; wall time not yet measured here.
Paper top-1 (docs/training.md#paper-results): AiT-Base 60.78, AiT-Medium 60.58, ViT-Base 57.92, ViT-Medium 55.78.
"""
from ait_jax import config_lib


def get_config(arg=None):
  return config_lib.apply_variant(config_lib.cifar_config('cifar100'), arg)
