r"""Imports a checkpoint of the published PyTorch AiT as an ait_jax one (docs/reference_port.md).

`convert` maps the reference's `state_dict` (numpy arrays under the reference's names) onto this
project's `params` and `memory` trees; the command writes them as an ordinary ait_jax checkpoint:

  python -m ait_jax.convert --reference=FILE.pth --config=configs/cifar10.py:model=small \
      --workdir=DIR
  python -m ait_jax.main --config=configs/cifar10.py:model=small --workdir=DIR --mode=eval \
      --config.model.eval_writes_memory=True   # the reference's evaluation protocol

Reading a .pth needs torch (`pip install -c constraints.txt -e '.[convert]'`); a .npz of the state_dict does not.
"""
import os
import re
from typing import Callable, Mapping, NamedTuple
import zipfile

import jax
import numpy as np

from ait_jax import errors

# Tensors the reference creates but never uses in AiT (docs/model.md): they are read and dropped.
UNUSED = ('pos_embedding', 'cls_token', 'to_patch_embedding_cnn.0.weight',
          'to_patch_embedding_cnn.0.bias')
# Per layer, the EMA momentum buffer: a constant of the config (model.memory_momentum), checked.
_BETA = re.compile(r'transformer\.layers\.(\d+)\.1\.fn\.memoryupdate\.beta')


class Rule(NamedTuple):
  """One reference tensor -> one leaf of an ait_jax collection, through `transform`."""
  source: str  # the reference's state_dict name
  collection: str  # 'params' or 'memory'
  path: tuple  # keys inside the collection
  transform: Callable[[np.ndarray], np.ndarray]


def copy(a: np.ndarray) -> np.ndarray:
  return a


def linear(a: np.ndarray) -> np.ndarray:
  """PyTorch Linear weights are [out, in]; Flax Dense kernels are [in, out]."""
  return a.T


def interleaved_linear(heads: int) -> Callable[[np.ndarray], np.ndarray]:
  """The write's output projection: the reference's column d·H + h is head h, dimension d.

  It stacks the per-head reads as [M, H, dv] and views them as [M, dv·H] after a transpose, so the
  columns are dimension-major; ait_jax concatenates head-major (h·dv + d): permute, then transpose.
  """
  def transform(a: np.ndarray) -> np.ndarray:
    out, cols = a.shape
    if cols % heads:
      return a.T  # a wrong width: let the shape check name the tensor
    return a.reshape(out, cols // heads, heads).transpose(0, 2, 1).reshape(out, cols).T
  return transform


def _norm(source: str, path: tuple) -> list[Rule]:
  return [Rule(f'{source}.weight', 'params', path + ('scale',), copy),
          Rule(f'{source}.bias', 'params', path + ('bias',), copy)]


def _dense(source: str, path: tuple, bias: bool = True, transform=linear) -> list[Rule]:
  rules = [Rule(f'{source}.weight', 'params', path + ('kernel',), transform)]
  if bias:
    rules.append(Rule(f'{source}.bias', 'params', path + ('bias',), copy))
  return rules


def rules(depth: int, memory_heads: int, question: bool) -> list[Rule]:
  """The whole mapping, for a model of `depth` blocks (with a question token if `question`)."""
  out = (_norm('to_patch_embedding.1', ('patch_norm_in',))
         + _dense('to_patch_embedding.2', ('patch_embed',))
         + _norm('to_patch_embedding.3', ('patch_norm_out',)))
  if question:
    out += (_norm('question_to_embedding.0', ('question_norm_in',))
            + _dense('question_to_embedding.1', ('question_embed',))
            + _norm('question_to_embedding.2', ('question_norm_out',)))
  for i in range(depth):
    attn, gwl, b = f'transformer.layers.{i}.0', f'transformer.layers.{i}.1', f'block{i}'
    mha, ws = f'{gwl}.fn.memoryupdate.mha', (b, 'workspace')
    out += (_norm(f'{attn}.norm', (b, 'norm1'))
            + _dense(f'{attn}.fn.to_qkv', (b, 'attn', 'qkv'), bias=False)
            + _dense(f'{attn}.fn.to_out.0', (b, 'attn', 'out'))
            + _norm(f'{gwl}.norm', (b, 'norm2'))
            + _dense(f'{gwl}.fn.fc1', (b, 'ffn', 'fc1'))
            + _dense(f'{gwl}.fn.fc2', (b, 'ffn', 'fc2'))
            + _norm(f'{gwl}.fn.norm', (b, 'ffn_norm'))
            + _dense(f'{mha}.w_qs', ws + ('query',), bias=False)
            + _dense(f'{mha}.w_ks', ws + ('key',), bias=False)
            + _dense(f'{mha}.w_vs', ws + ('value',), bias=False)
            + _dense(f'{mha}.fc', ws + ('out',), bias=False,
                     transform=interleaved_linear(memory_heads))
            + _norm(f'{mha}.layer_norm', ws + ('write_norm',))
            + _dense(f'{gwl}.fn.fc3', ws + ('prior_proj',)))
    out.append(Rule(f'{gwl}.fn.memoryupdate.memory', 'memory', ws + ('slots',), copy))
  return out + _norm('mlp_head.0', ('head_norm',)) + _dense('mlp_head.1', ('head',))


def model_rules(model, target: Mapping) -> list[Rule]:
  """`rules` for an `ait_jax.models.AiT` whose abstract variables are `target`."""
  if model.vit:
    raise errors.ConfigError(
        'The reference checkpoint is an AiT; convert it with an AiT config, not the '
        'ViT baseline (model.vit=False).')
  return rules(model.depth, model.workspace.get('memory_heads', 8),
               'question_embed' in target['params'])


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: Mapping) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def convert(state_dict: Mapping[str, np.ndarray], model, target: Mapping,
            mapping: list[Rule] | None = None) -> dict:
  """Maps a reference state_dict onto the collections of `target` ({'params': ..., 'memory': ...}).

  target: the model's (abstract) variables, e.g. `jax.eval_shape(model.init, ...)`; only the
  collections it holds are filled, so a dict of gradients maps with target={'params': ...}.
  Every tensor is used, or listed in UNUSED (or is a momentum buffer, checked against the config).
  Returns {collection: tree} with float32 numpy leaves. Raises one ValueError naming the tensor
  that is missing, unexpected or of the wrong shape.
  """
  mapping = model_rules(model, target) if mapping is None else mapping
  flat_targets = {c: _flatten(target[c]) for c in target if c in ('params', 'memory')}
  out = {c: {} for c in flat_targets}
  used = set()
  for rule in mapping:
    if rule.collection not in flat_targets:
      continue
    if rule.path not in flat_targets[rule.collection]:
      raise errors.ConfigError(f'The model has no {rule.collection} {"/".join(rule.path)} for the '
                               f'reference tensor {rule.source}: convert with an AiT config of the '
                               'reference layout (posemb=none, head=flatten, self_attention=True).')
    if rule.source not in state_dict:
      raise errors.InputError(
          f'The reference state_dict has no tensor {rule.source!r}, which '
          f'{"/".join(rule.path)} needs: is it a checkpoint of the published AiT '
          'with the same depth (and question input) as the config?')
    value = np.asarray(rule.transform(np.asarray(state_dict[rule.source], np.float32)))
    expected = tuple(flat_targets[rule.collection][rule.path].shape)
    if value.shape != expected:
      shown = expected[::-1] if rule.transform is not copy else expected
      raise errors.InputError(f'Reference tensor {rule.source} has shape '
                              f'{tuple(np.shape(state_dict[rule.source]))} but the config needs '
                              f'{shown}: set the config\'s model sizes (width, mlp_dim, num_heads, '
                              'patch_size, memory_*) to those of the checkpoint.')
    out[rule.collection][rule.path] = value
    used.add(rule.source)
  for collection, leaves in flat_targets.items():
    missing = sorted('/'.join(p) for p in set(leaves) - set(out[collection]))
    if missing:
      raise errors.InputError(
          f'The reference has nothing for {collection} {missing}: convert with an '
          'AiT config of the reference layout (posemb=none, head=flatten).')
  _check_leftovers(state_dict, used, model)
  return {c: _unflatten(leaves) for c, leaves in out.items()}


def _check_leftovers(state_dict: Mapping, used: set, model) -> None:
  momentum = model.workspace.get('memory_momentum', 0.9)
  unexpected = []
  for name in sorted(set(state_dict) - used):
    if name in UNUSED:
      continue
    if _BETA.fullmatch(name):
      if not np.isclose(float(np.asarray(state_dict[name])), momentum):
        raise errors.InputError(
            f'Reference tensor {name} is {float(np.asarray(state_dict[name]))} but '
            f'the config has model.memory_momentum={momentum}: make them equal.')
      continue
    unexpected.append(name)
  if unexpected:
    raise errors.InputError(
        f'The reference state_dict has tensors this model does not use: '
        f'{unexpected[:4]}{" ..." if len(unexpected) > 4 else ""}; does the config '
        'have the depth (and question input) of the checkpoint?')


def abstract_variables(model, image_shape, question_dim: int = 0, batch_size: int = 1) -> dict:
  """The shapes of `model`'s variables (unboxed from their logical axes), without allocating them."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  images = jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32)
  question = jax.ShapeDtypeStruct((batch_size, question_dim), jnp.float32) if question_dim else None
  return nn.unbox(jax.eval_shape(
      lambda rng, x, q: model.init({'params': rng, 'dropout': rng}, x, q, train=True),
      jax.random.key(0), images, question))


def _load_npz(path: str) -> dict:
  """The arrays of a .npz (those under 'state_dict/' when there are such, the prefix removed),
  read without pickle: a file that is not a zip of numeric arrays (or that holds pickled
  objects, which are never unpickled) is refused in one sentence."""
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      lone_array = f.read(6) == b'\x93NUMPY'
    raise errors.InputError(
        f'{path} holds one array, not a state_dict; save a .npz with one array per tensor name '
        '(numpy.savez(path, **state_dict)).' if lone_array else
        f'{path} is not a .npz (not a zip archive of arrays); pass the reference state_dict saved '
        'with numpy.savez, or a .pth.')
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.InputError(f'{path} is not a readable .npz ({_reason(e)}); pass the reference '
                            'state_dict saved with numpy.savez, or a .pth.') from None
  prefix = 'state_dict/'  # the project's fixtures keep other entries beside the state_dict
  arrays = {}
  with data:
    keys = data.files
    if any(k.startswith(prefix) for k in keys):
      keys = [k for k in keys if k.startswith(prefix)]
    for key in keys:
      try:
        value = data[key]
      except ValueError:  # object arrays need pickle, which is never used here
        raise errors.InputError(f'{path} holds pickled objects ({key}), which are not loaded; save '
                                'plain numeric arrays (numpy.savez of tensor.numpy()).') from None
      if not isinstance(value, np.ndarray) or value.dtype.kind not in 'biuf':
        raise errors.InputError(f'{path} holds {key!r}, which is not a numeric array; a checkpoint '
                                '.npz holds one numeric array per tensor name.')
      arrays[key.removeprefix(prefix)] = value
  if not arrays:
    raise errors.InputError(f'{path} holds no arrays; pass the .npz of the reference state_dict.')
  return arrays


def _reason(error: BaseException) -> str:
  return ' '.join(f'{type(error).__name__}: {error}'.split())[:160]


def load_state_dict(path: str) -> dict:
  """A state_dict as numpy arrays from a .pth (needs torch) or a .npz (keys may carry the
  'state_dict/' prefix of the project's test fixtures). Anything else is refused in one
  sentence; nothing is ever unpickled except by torch's weights-only loader."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No reference checkpoint at {path}.')
  if os.path.isdir(path):
    raise errors.InputError(
        f'{path} is a folder; pass the reference checkpoint file (.pth or .npz).')
  if path.endswith('.npz'):
    return _load_npz(path)
  if not path.endswith(('.pth', '.pt')):
    raise errors.InputError(
        f'{path} is not a checkpoint this command reads: pass a .pth (PyTorch) or a '
        '.npz of the state_dict.')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.InputError(
        'Reading a .pth needs PyTorch: pip install -c constraints.txt -e .[convert] (or save the '
        'state_dict as a .npz of numpy arrays, which needs no torch).') from None
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (not a zip, unpickling refused, ...)
    raise errors.InputError(f'{path} is not a PyTorch checkpoint of tensors torch can read safely '
                            f'({_reason(e)}); pass the reference state_dict.') from None
  if isinstance(loaded, Mapping) and 'state_dict' in loaded and isinstance(
      loaded['state_dict'], Mapping):
    loaded = loaded['state_dict']
  if not isinstance(loaded, Mapping):
    raise errors.InputError(f'{path} does not hold a state_dict (a dict of tensors); save it with '
                            'torch.save(net.state_dict(), path).')
  # torch.save of a DataParallel model prefixes every name with 'module.'.
  return {k.removeprefix('module.'): v.detach().cpu().float().numpy() for k, v in loaded.items()}


def write_checkpoint(config, reference: str, workdir: str) -> str:
  """Converts `reference` for `config` and saves it as step 0 of an ait_jax workdir."""
  from ait_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from ait_jax import train  # pylint: disable=g-import-not-at-top
  root = checkpointing.workdir_path(workdir)
  if any((root / d).exists() for d in ('checkpoints', 'best')):
    raise errors.InputError(f'{workdir} already holds a checkpoint; convert into a new --workdir.')
  state_dict = load_state_dict(reference)
  trainer = train.Trainer(config)
  abstract = trainer.abstract_state
  variables = convert(state_dict, trainer.s.model,
                      {'params': abstract.params, 'memory': abstract.memory})
  sh = trainer.state_sharding
  params = jax.device_put(variables['params'], sh.params)
  state = trainer.init(trainer.rng).replace(
      params=params, memory=jax.device_put(variables['memory'], sh.memory),
      opt_state=jax.jit(trainer.tx.init, out_shardings=sh.opt_state)(params))
  root.mkdir(parents=True, exist_ok=True)
  train._save_config(config, workdir)  # pylint: disable=protected-access
  ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
  ckpt.save(0, state)
  ckpt.wait()
  ckpt.close()
  return str(root)


def define_flags(fv) -> None:
  """The command's flags (ait_jax/cli.py: defined only when this module runs as a command)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('reference', None, 'The reference state_dict: a .pth (needs torch) or .npz.',
                      flag_values=fv)
  config_flags.DEFINE_config_file('config', None, 'A configs/*.py file with :variant matching '
                                  'the checkpoint (depth, width, ...).', lock_config=True,
                                  flag_values=fv)
  flags.DEFINE_string('workdir', None, 'A new workdir; the checkpoint is saved as its step 0.',
                      flag_values=fv)


def main(fv) -> None:
  from ait_jax import cli  # pylint: disable=g-import-not-at-top
  cli.require(fv, 'reference', hint='FILE (.pth or .npz)')
  cli.require(fv, 'config', hint='configs/<dataset>.py[:variant]')
  cli.require(fv, 'workdir', hint='DIR (a new workdir)')
  where = write_checkpoint(fv.config, fv.reference, fv.workdir)
  print(f'Wrote step 0 to {where}; evaluate it with python -m ait_jax.main --mode=eval '
        f'--workdir={fv.workdir} and the same --config.')


if __name__ == '__main__':
  from ait_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(define_flags, main)
