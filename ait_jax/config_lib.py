"""Shared pieces of the `configs/*.py` files: the base training config, variant strings, checks.

A config file's `get_config(arg)` starts from `base_config()`, sets its dataset's recipe, then
`apply_variant(config, arg)` handles `model=<preset>|vit_<preset>`, `ablation=...` and `quick`
(ait_jax/main.py's docstring, which is `main --help`, lists them for users).
"""
import os

import ml_collections

from ait_jax import errors
from ait_jax import models

# The spellings a variant's boolean accepts (`quick`, `quick=true`, `quick=0`, ...); anything else
# is refused rather than read as False, which would silently run the full config.
TRUE_WORDS = ('1', 'true', 'yes')
FALSE_WORDS = ('0', 'false', 'no')

ABLATIONS = {  # docs/model.md#ablations: name -> model fields
    'none': {},
    'no_bottleneck': {'bottleneck': False},
    'no_self_attention': {'self_attention': False},
    'no_hopfield': {'retrieval': 'cross_attention'},
    'no_balance_loss': {'balance_coef': 0.0},
    'memory_reset': {'memory_reset': True},
    'no_memory': {'vit': True},
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'model=base,quick' -> {model: 'base', quick: True}, over the given defaults (big_vision)."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    key = key.strip()
    if key not in out:
      raise errors.ConfigError(f'Unknown config variant {key!r}; valid: {", ".join(sorted(out))}.')
    if not eq:
      out[key] = True
    elif isinstance(out[key], bool):
      word = value.strip().lower()
      if word not in TRUE_WORDS + FALSE_WORDS:
        raise errors.ConfigError(
            f'Config variant {key}={value!r} is not a boolean; write {key} (or {key}='
            f'{"|".join(TRUE_WORDS)}) to turn it on, or {key}={"|".join(FALSE_WORDS)} (or leave '
            'it out) to keep it off.')
      out[key] = word in TRUE_WORDS
    else:
      out[key] = type(out[key])(value) if out[key] is not None else value
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Fields every training config has; values are the reference recipe (docs/training.md#recipe)."""
  c = ml_collections.ConfigDict()
  c.dataset = ''
  c.data_dir = os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))
  c.question_types = ()  # Sort-of-CLEVR: which question types to train and evaluate on
  c.augment = True
  c.batch_size = 512
  c.eval_batch_size = 512
  c.num_epochs = 100
  c.total_steps = -1  # > 0 overrides num_epochs
  c.lr = 1e-4
  c.warmup_epochs = 5.0
  c.warmup_init_lr = 1e-5
  c.end_lr = 1e-6
  c.schedule_unit = 'epoch'  # 'epoch': the LR changes once per epoch, as the reference; or 'step'
  c.weight_decay = 0.01
  c.b1, c.b2, c.adam_eps = 0.9, 0.999, 1e-8
  c.grad_clip_norm = 0.0  # 0: no clipping (reference)
  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_steps = -1  # -1: once per epoch
  # Train-split examples (the first ones, eval preprocessing, the test evaluation's memory rule)
  # scored beside the test split at every evaluation, so that memorisation shows in the curves:
  # -1: as many as the test split, at most 10,000; 0: none.
  c.eval_train_examples = -1
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.mesh = ml_collections.ConfigDict({'data': -1, 'model': 1})
  # How parameters and optimizer state lie on the mesh (sharding.RULES): 'replicated' on every
  # data shard, or 'fsdp', split over 'data' and gathered where used (less HBM per chip).
  c.sharding = 'replicated'
  c.prefetch = 2  # global batches grain keeps ready
  c.read_threads = 1  # grain threads reading and decoding batches (zlib and PIL free the GIL)
  # Tiny steps (Triangle, Sort-of-CLEVR) are bound by the host, not the accelerator:
  c.device_data = False  # hold the train split on the devices and gather batches there
  c.steps_per_call = 1  # optimisation steps per jitted call (lax.scan); never crosses a log,
                        # eval or save step, so K dividing log_every_steps compiles once
  # A jax.profiler trace of profile_steps train steps (0: none) after the first
  # profile_skip_steps of the process, into <workdir>/tensorboard, for TensorBoard's profile
  # tab; the ops that took the most time go to <workdir>/profile_summary.json (profiling.py).
  c.profile_steps = 0
  c.profile_skip_steps = 2
  c.model = models.default_config()
  return c



def cifar_config(dataset: str) -> ml_collections.ConfigDict:
  """The recipe of configs/cifar10.py and cifar100.py, which differ only in the dataset."""
  c = base_config()
  c.dataset = dataset
  c.model.preset = 'base'
  c.model.patch_size = 4
  c.model.bottleneck_k = 512
  return c


def split_preset(name: str) -> tuple[bool, str]:
  """'vit_base' -> (True, 'base'), 'base' -> (False, 'base'): a model variant names the ViT
  baseline of a preset by the prefix vit_."""
  if name.startswith('vit_'):
    return True, name[len('vit_'):]
  return False, name


def apply_variant(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies `model=small|vit_small|...`, `ablation=...` and `quick` to a dataset's config."""
  v = parse_arg(arg, model=c.model.preset, ablation='none', quick=False)
  vit, preset = split_preset(v.model)
  if vit:
    c.model.vit = True
  if preset not in models.PRESETS:
    raise errors.ConfigError(
        f'Unknown model variant {v.model!r}; use one of '
        f'{", ".join(list(models.PRESETS) + ["vit_" + p for p in models.PRESETS])}.')
  c.model.preset = preset
  if v.ablation not in ABLATIONS:
    raise errors.ConfigError(f'Unknown ablation {v.ablation!r}; use one of {", ".join(ABLATIONS)}.')
  c.model.update(ABLATIONS[v.ablation])
  if v.quick:  # a CPU smoke run: a narrow 1-layer model, a few steps
    c.model.update(depth=1, width=64, mlp_dim=128, num_heads=1)
    c.batch_size = min(c.batch_size, 64)
    c.eval_batch_size = 256
    c.total_steps = 60
    c.warmup_epochs = 0.0
    c.schedule_unit = 'step'
    c.lr = 1e-3
    c.log_every_steps = 10
    c.eval_every_steps = 30
    c.eval_train_examples = 256  # one evaluation batch
    c.checkpoint_every_steps = 30
  return c
