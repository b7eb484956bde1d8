"""The AiT classifier and its dense ViT baseline as Flax Linen modules (docs/model.md).

The explicit memory of every block is the variable collection 'memory' (state, never a parameter):
`model.apply(variables, x, train=True, mutable=['memory'])` returns the written memory.
"""
import dataclasses
import typing
from typing import Any, Literal, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ait_jax import errors
from ait_jax import hopfield
from ait_jax import workspace

Dtype = Any

# docs/model.md#sizes. Every preset uses 64-dim attention heads.
PRESETS = {
    'small': dict(depth=2, width=768, mlp_dim=3072, num_heads=12),
    'medium': dict(depth=6, width=768, mlp_dim=3072, num_heads=12),
    'base': dict(depth=12, width=768, mlp_dim=3072, num_heads=12),
    'large': dict(depth=24, width=1024, mlp_dim=4096, num_heads=16),
    'coordination': dict(depth=1, width=256, mlp_dim=512, num_heads=4),
}
DTYPES = ('float32', 'bfloat16')  # modules take dtype names, as configs do
BACKBONE_LN_EPS = 1e-5  # torch.nn.LayerNorm default, as in the reference code
WRITE_LN_EPS = 1e-6  # docs/model.md#memory-write

INITS = ('reference', 'xavier')  # model.init: how parameters start (docs/model.md#init)


def _uniform(bound: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dense_inits(init: str, fan_in: int):
  """(kernel_init, bias_init) of a Dense layer with `fan_in` inputs.

  'reference': torch.nn.Linear's default, which the published code never overrides: kernel and
  bias both U(±1/√fan_in) (kaiming_uniform with a=√5). 'xavier': Xavier-uniform kernel, zero bias.
  """
  if init == 'reference':
    return _uniform(fan_in ** -0.5), _uniform(fan_in ** -0.5)
  return nn.initializers.xavier_uniform(), nn.initializers.zeros_init()


def _token_inits(init: str):
  """(posemb_init, cls_init): the published code draws both with torch.randn (it creates them
  without using them); the 'xavier' scheme keeps ViT's N(0, 0.02²) and zeros."""
  if init == 'reference':
    return nn.initializers.normal(1.0), nn.initializers.normal(1.0)
  return nn.initializers.normal(0.02), nn.initializers.zeros_init()

# Every parameter names its dimensions with these logical axes (nn.with_logical_partitioning);
# ait_jax/sharding.py's rule tables map them to the mesh, so a new parameter needs no edit there.
# 'norm' (LayerNorm scales and biases) and 'classes' stay replicated under every rule set.
LOGICAL_AXES = ('patch', 'question', 'embed', 'heads', 'head_dim', 'mlp', 'memory_dim',
                'memory_heads', 'head_in', 'classes', 'norm')


def _logical(init, *axes):
  return nn.with_logical_partitioning(init, axes)


def _dense(x, features: int, axes: tuple[str, str], *, name: str, init: str,
           use_bias: bool = True, **kw):
  """nn.Dense applied to x, its kernel and bias drawn by `init` for x's fan-in, its kernel's axes
  (in, out) named."""
  kernel_init, bias_init = _dense_inits(init, x.shape[-1])
  return nn.Dense(features, use_bias=use_bias, kernel_init=_logical(kernel_init, *axes),
                  bias_init=_logical(bias_init, axes[1]), name=name, **kw)(x)


def _layer_norm(name: str | None = None, eps: float = BACKBONE_LN_EPS, axis: str = 'norm',
                **kw) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, name=name,
                      scale_init=_logical(nn.initializers.ones_init(), axis),
                      bias_init=_logical(nn.initializers.zeros_init(), axis), **kw)


class SelfAttention(nn.Module):
  """Multi-head self-attention with 64-dim heads, qkv without bias, output with bias (docs/model.md#backbone)."""
  num_heads: int
  param_init: Literal[INITS] = 'reference'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    kw = dict(init=self.param_init, dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = _dense(x, 3 * d, ('embed', 'heads'), use_bias=False, name='qkv', **kw)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 3, axis=2)
    out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return _dense(out.reshape(b, n, d), d, ('heads', 'embed'), name='out', **kw)


class FeedForward(nn.Module):
  """Dense(mlp) → exact GELU → Dense(D)."""
  mlp_dim: int
  param_init: Literal[INITS] = 'reference'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(init=self.param_init, dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.gelu(_dense(x, self.mlp_dim, ('embed', 'mlp'), name='fc1', **kw), approximate=False)
    return _dense(h, x.shape[-1], ('mlp', 'embed'), name='fc2', **kw)


class GlobalWorkspace(nn.Module):
  """The Global Workspace Layer: bottleneck write into the shared memory, Hopfield read-back.

  docs/model.md#block. `s` [B, N, D] are the normalised FFN outputs; returns
  (r, balance_loss) with r the retrieved priors per token. The memory is written when training, or at
  evaluation only with `eval_writes_memory` (the reference protocol, which makes predictions batch
  dependent). Every field here is also a field of a config's `model`, under the same name.
  `token_mask` [B, N] bool, False for the tokens of an evaluation batch's padding, keeps them out
  of the write (docs/model.md#batch-dependence).
  """
  memory_slots: int = 32  # M
  memory_dim: int = 32  # Dm
  memory_heads: int = 8  # Hm
  bottleneck: bool = True  # False: dense cross-attention write (ablation 'without bottleneck')
  bottleneck_k: int = 512  # tokens each (head, slot) keeps
  bottleneck_scope: Literal['batch', 'example'] = 'batch'  # the tokens that compete: batch | image
  gradient_mode: Literal['reference', 'learned_write'] = 'reference'
  eval_writes_memory: bool = False
  memory_momentum: float = 0.9
  write_dropout: float = 0.1
  memory_reset: bool = False
  retrieval: Literal['hopfield', 'cross_attention'] = 'hopfield'
  hopfield_beta: float = 1.0
  hopfield_steps: int = 1
  balance_coef: float = 0.01
  selection: Literal[workspace.SELECTIONS] = 'auto'  # the top-k algorithm; every one is exact
  param_init: Literal[INITS] = 'reference'  # config field `init`; see AiT.param_init
  dtype: Dtype = 'float32'
  param_dtype: Dtype = 'float32'

  @nn.compact
  def __call__(self, s, *, train: bool, token_mask=None):
    """docs/model.md#block, one line each: the write (§3–4), the priors, the retrieval (§5)."""
    memory = self.variable('memory', 'slots', lambda: jax.random.normal(
        self.make_rng('params'), (self.memory_slots, self.memory_dim), jnp.float32))
    # The memory is state: the optimizer never sees it and no gradient reaches it (§6).
    mem = jax.lax.stop_gradient(memory.value)
    if train or self.eval_writes_memory or self.is_initializing():
      mem_new, balance = self._write(mem, s, train=train, token_mask=token_mask)
      self._store(memory, mem_new)
    else:  # read-only evaluation: predictions independent of the batch (§7)
      mem_new, balance = mem, jnp.zeros((), jnp.float32)
    priors = _dense(mem_new.astype(self.dtype), s.shape[-1], ('memory_dim', 'embed'),
                    name='prior_proj', **self._kw())  # P, [M, D]
    r = self._retrieve(s, priors)
    if self.is_mutable_collection('intermediates'):
      self.sow('intermediates', 'energy_before', hopfield.hopfield_energy(s, priors,
                                                                          self.hopfield_beta))
      self.sow('intermediates', 'energy_after', hopfield.hopfield_energy(r, priors,
                                                                         self.hopfield_beta))
    return r.astype(s.dtype), balance

  def _kw(self) -> dict:
    return dict(init=self.param_init, dtype=self.dtype, param_dtype=self.param_dtype)

  def _write(self, mem, s, *, train: bool, token_mask):
    """(mem_new, balance): the bottleneck attention of the memory's queries over the tokens in
    scope, the write's Dense, dropout and LayerNorm, and the EMA (docs/model.md#memory-write)."""
    b, n, _ = s.shape
    m, dm, hm = self.memory_slots, self.memory_dim, self.memory_heads
    q = _dense(mem.astype(self.dtype), hm * dm, ('memory_dim', 'memory_heads'), use_bias=False,
               name='query', **self._kw())
    k = _dense(s, hm * dm, ('embed', 'memory_heads'), use_bias=False, name='key', **self._kw())
    v = _dense(s, hm * dm, ('embed', 'memory_heads'), use_bias=False, name='value', **self._kw())
    groups, per_group = (1, b * n) if self.bottleneck_scope == 'batch' else (b, n)
    split = lambda t: t.reshape(groups, per_group, hm, dm).transpose(0, 2, 1, 3)
    top_k = self._top_k(per_group, train)
    # Init only needs shapes (and may run outside any mesh): every selection gives the same.
    selection = ('full' if self.is_initializing() else
                 workspace.resolve_selection(self.selection, groups, per_group, top_k))
    mask = None if token_mask is None else token_mask.reshape(groups, per_group)
    out = workspace.bottleneck_attention(q.reshape(m, hm, dm).transpose(1, 0, 2), split(k),
                                         split(v), top_k, selection, token_mask=mask)
    read = out.read.transpose(1, 0, 2).reshape(m, hm * dm)
    y = _dense(read, dm, ('memory_heads', 'memory_dim'), use_bias=False, name='out',
               **self._kw())
    y = nn.Dropout(self.write_dropout)(y, deterministic=not train)
    y = _layer_norm('write_norm', eps=WRITE_LN_EPS, param_dtype=self.param_dtype)(
        y.astype(jnp.float32) + mem)
    if self.gradient_mode == 'reference':
      y = jax.lax.stop_gradient(y)  # §6: Wv, Wo and write_norm get no gradient
    if self.is_mutable_collection('intermediates'):
      self.sow('intermediates', 'bottleneck_indices', out.indices)
      self.sow('intermediates', 'bottleneck_weights', out.weights)
    return (workspace.ema_write(mem, y, self.memory_momentum),
            workspace.balance_loss(out.importance, out.load, self.balance_coef))

  def _top_k(self, per_group: int, train: bool) -> int | None:
    """The tokens each (head, slot) keeps: None without the bottleneck. Training batches are
    checked by the config (`models.validate`); an evaluation (or init) on a smaller batch keeps
    every token rather than fail."""
    if not self.bottleneck:
      return None
    if not train or self.is_initializing():
      return min(self.bottleneck_k, per_group)
    return self.bottleneck_k

  def _store(self, memory, mem_new) -> None:
    """mem_new becomes the stored memory, except at init and with memory_reset (§3)."""
    if self.memory_reset or self.is_initializing():
      return
    if not self.is_mutable_collection('memory'):
      raise ValueError("This call writes the memory (train=True or eval_writes_memory=True): "
                       "pass mutable=['memory'] to apply and keep the returned memory.")
    memory.value = jax.lax.stop_gradient(mem_new)

  def _retrieve(self, s, priors):
    """Each token reads the priors: one Hopfield step (§5), or the 'without Hopfield' ablation's
    learned cross-attention (§9)."""
    if self.retrieval == 'hopfield':
      return hopfield.hopfield_retrieve(s, priors, self.hopfield_beta, self.hopfield_steps)
    b, m, d = s.shape[0], *priors.shape
    if self.param_init == 'reference':  # every projection's fan-in is D, as in torch's Linear
      kernel, bias = _dense_inits('reference', d)
    else:
      kernel, bias = nn.linear.default_kernel_init, nn.initializers.zeros_init()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return nn.MultiHeadDotProductAttention(
        num_heads=max(1, d // 64), name='cross_attention',
        kernel_init=_logical(kernel, 'embed', 'heads', 'head_dim'),
        bias_init=_logical(bias, 'heads', 'head_dim'),
        out_kernel_init=_logical(kernel, 'heads', 'head_dim', 'embed'),
        out_bias_init=_logical(bias, 'embed'), **kw,
    )(s, jnp.broadcast_to(priors, (b, m, d)))


class Block(nn.Module):
  """One pre-norm block: self-attention, FFN and, for AiT, the global workspace (docs/model.md#block)."""
  num_heads: int
  mlp_dim: int
  use_workspace: bool = True
  self_attention: bool = True
  workspace: dict = dataclasses.field(default_factory=dict)
  param_init: Literal[INITS] = 'reference'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, token_mask=None):
    ln = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    kw = dict(param_init=self.param_init, **ln)
    if self.self_attention:
      x = x + SelfAttention(self.num_heads, name='attn', **kw)(_layer_norm('norm1', **ln)(x))
    h = FeedForward(self.mlp_dim, name='ffn', **kw)(_layer_norm('norm2', **ln)(x))
    if not self.use_workspace:
      return x + h, jnp.zeros((), jnp.float32)
    s = _layer_norm('ffn_norm', **ln)(h)
    r, balance = GlobalWorkspace(name='workspace', **self.workspace, **kw)(
        s, train=train, token_mask=token_mask)
    return x + s + r, balance


class AiT(nn.Module):
  """AiT classifier (or, with vit=True, the dense ViT of the same backbone).

  __call__(images [B, H, W, C] float, question [B, Q] or None, train) -> (logits, aux) with
  aux['balance_loss'] the sum over layers of the bottleneck balance loss
  (docs/model.md#balance-loss). `workspace` holds the GlobalWorkspace fields. A config's `model`
  has the fields of both modules, flat and under the same names (`create_model` splits them).
  `example_mask` [B] bool, False on the padding of an evaluation batch, keeps every token of those
  images out of a memory write (docs/model.md#batch-dependence); they are still computed.
  """
  num_classes: int
  patch_size: int = 4
  depth: int = 2
  width: int = 768
  mlp_dim: int = 3072
  num_heads: int = 12
  vit: bool = False  # True: the dense ViT baseline (ablation 'without memory')
  self_attention: bool = True  # False: ablation 'without self-attention'
  posemb: Literal['none', 'learned'] = 'none'  # none is faithful
  head: Literal['flatten', 'mean', 'cls'] = 'flatten'  # flatten is faithful
  workspace: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # How parameters start: 'reference' (the published code's torch defaults) or 'xavier'. The
  # config calls it `init` (Module.init is Flax's method); docs/model.md#init.
  param_init: Literal[INITS] = 'reference'
  dtype: Dtype = 'float32'
  param_dtype: Dtype = 'float32'

  @nn.compact
  def __call__(self, images, question=None, *, train: bool = False, example_mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hh, ww, c = images.shape
    p = self.patch_size
    # (row, col, channel) order inside a patch, channel fastest (docs/model.md#backbone).
    x = images.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (hh // p) * (ww // p), p * p * c).astype(self.dtype)
    x = _layer_norm('patch_norm_in', **kw)(x)
    x = _dense(x, self.width, ('patch', 'embed'), name='patch_embed', init=self.param_init, **kw)
    x = _layer_norm('patch_norm_out', **kw)(x)
    posemb_init, cls_init = _token_inits(self.param_init)
    if self.posemb == 'learned':
      x = x + self.param('posemb', _logical(posemb_init, None, None, 'embed'),
                         (1,) + x.shape[1:], self.param_dtype).astype(self.dtype)
    if question is not None:  # docs/model.md#question-token: one extra token before the patches
      qt = _layer_norm('question_norm_in', **kw)(question.astype(self.dtype))
      qt = _dense(qt, self.width, ('question', 'embed'), name='question_embed',
                  init=self.param_init, **kw)
      qt = _layer_norm('question_norm_out', **kw)(qt)
      x = jnp.concatenate([qt[:, None], x], axis=1)
    if self.head == 'cls':
      cls = self.param('cls', _logical(cls_init, None, None, 'embed'),
                       (1, 1, self.width), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(self.dtype), x], 1)

    token_mask = (None if example_mask is None else  # the question and CLS tokens too
                  jnp.broadcast_to(jnp.asarray(example_mask, bool)[:, None], x.shape[:2]))
    balance = jnp.zeros((), jnp.float32)
    for i in range(self.depth):
      x, layer_balance = Block(self.num_heads, self.mlp_dim, not self.vit,
                               self.self_attention, dict(self.workspace), self.param_init,
                               name=f'block{i}', **kw)(x, train=train, token_mask=token_mask)
      balance = balance + layer_balance

    if self.head == 'flatten':  # docs/model.md#backbone: LayerNorm over the whole token grid
      x = x.reshape(b, -1)
    elif self.head == 'mean':
      x = x.mean(axis=1)
    else:
      x = x[:, 0]
    x = _layer_norm('head_norm', axis='head_in', **kw)(x)
    logits = _dense(x, self.num_classes, ('head_in', 'classes'), name='head',
                    init=self.param_init, **kw)
    return logits.astype(jnp.float32), {'balance_loss': balance}


def default_config() -> ml_collections.ConfigDict:
  """The `model` fields of a training config: every field of `AiT` and `GlobalWorkspace` (same
  names, faithful defaults) plus `preset`. None for a size field means "from the preset"."""
  return ml_collections.ConfigDict(dict(
      preset='small',  # a row of PRESETS (docs/model.md#sizes)
      # None: from the preset; typed placeholders so that --config.model.depth=1 can set them.
      **{f: ml_collections.config_dict.placeholder(int)
         for f in ('depth', 'width', 'mlp_dim', 'num_heads')},
      patch_size=4,
      vit=False,  # True: the dense ViT baseline ('without memory' ablation)
      self_attention=True,  # False: 'without self-attention' ablation
      posemb='none',  # none (faithful) | learned
      head='flatten',  # flatten (faithful) | mean | cls
      memory_slots=32, memory_dim=32, memory_heads=8,
      bottleneck=True,  # False: dense cross-attention write ('without bottleneck')
      bottleneck_k=512,
      bottleneck_scope='batch',  # batch (faithful: the batch's tokens compete) | example (k <= N)
      gradient_mode='reference',  # reference (faithful) | learned_write (project addition)
      eval_writes_memory=False,  # True reproduces the reference's batch-dependent evaluation
      retrieval='hopfield',  # hopfield | cross_attention ('without Hopfield')
      hopfield_beta=1.0, hopfield_steps=1,
      balance_coef=0.01,  # 0: 'without balance loss'
      selection='auto',  # exact top-k: auto | full | chunked | sharded (docs/model.md)
      memory_reset=False,  # True: every batch writes from the initial memory ('memory reset')
      memory_momentum=0.9, write_dropout=0.1,
      init='reference',  # how parameters start: reference (faithful) | xavier (docs/model.md#init)
      dtype='float32',  # computation: float32 | bfloat16
      param_dtype='float32',
  ))


# Fields with a fixed set of values; integer fields with their minimum; fractions in [0, 1).
# A module field annotated Literal[...] is checked against its values, so an option with a fixed set
# of values needs nothing here.
CHOICES = {'preset': tuple(PRESETS), 'dtype': DTYPES, 'param_dtype': DTYPES}
AT_LEAST_ONE = ('depth', 'width', 'mlp_dim', 'num_heads', 'patch_size', 'memory_slots',
                'memory_dim', 'memory_heads', 'hopfield_steps')
HALF_OPEN_UNIT = ('write_dropout', 'memory_momentum')
POSITIVE = ('hopfield_beta',)
NON_NEGATIVE = ('balance_coef',)


# The one module field whose config name differs: `init` would hide Flax's Module.init.
_CONFIG_NAMES = {'param_init': 'init'}


def _literal_fields() -> dict[str, tuple]:
  """{field: allowed values} of the module fields annotated Literal[...]."""
  out = {}
  for module in (AiT, GlobalWorkspace):
    for name, hint in typing.get_type_hints(module).items():
      if typing.get_origin(hint) is Literal:
        out[_CONFIG_NAMES.get(name, name)] = typing.get_args(hint)
  return out


def _workspace_fields() -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(GlobalWorkspace)
               if f.name not in ('parent', 'name', 'dtype', 'param_dtype', 'param_init'))


def resolve(cfg: Mapping | str = 'small', **overrides) -> dict:
  """The model fields with the preset applied: a plain dict of every `default_config()` field."""
  fields = default_config().to_dict()
  if isinstance(cfg, str):
    cfg = {'preset': cfg}
  cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
  unknown = sorted((set(cfg) | set(overrides)) - set(fields))
  if unknown:
    raise errors.ConfigError(f'Unknown model field(s) {unknown}; valid fields: {sorted(fields)}.')
  fields.update(cfg)
  fields.update(overrides)
  if fields['preset'] in PRESETS:
    for name, value in PRESETS[fields['preset']].items():
      if fields[name] is None:
        fields[name] = value
  return fields


def validate(c: Mapping, *, image_shape, question_dim: int = 0,
             batch_size: int | None = None) -> None:
  """Checks resolved model fields; each bad value raises one ValueError that names its field."""
  for name, allowed in {**_literal_fields(), **CHOICES}.items():
    if c[name] not in allowed:
      raise errors.ConfigError(f'model.{name}={c[name]!r} is not one of '
                               f'{", ".join(map(repr, allowed))}.')
  for name in AT_LEAST_ONE:
    if not isinstance(c[name], int) or isinstance(c[name], bool) or c[name] < 1:
      raise errors.ConfigError(f'model.{name}={c[name]!r} must be a whole number of at least 1.')
  for name, ok, domain in [(n, lambda v: 0.0 <= v < 1.0, 'in [0, 1)') for n in HALF_OPEN_UNIT] + [
      (n, lambda v: v > 0, 'positive') for n in POSITIVE] + [
      (n, lambda v: v >= 0, 'non-negative') for n in NON_NEGATIVE]:
    if not isinstance(c[name], (int, float)) or isinstance(c[name], bool) or not ok(c[name]):
      raise errors.ConfigError(f'model.{name}={c[name]!r} must be a number {domain}.')
  if c['width'] % c['num_heads']:
    raise errors.ConfigError(f"model.width={c['width']} must be divisible by "
                             f"model.num_heads={c['num_heads']}.")
  h, w = image_shape[:2]
  p = c['patch_size']
  if h % p or w % p:
    raise errors.ConfigError(f'model.patch_size={p} must divide the image size {h}x{w}.')
  if not c['vit'] and c['bottleneck']:
    top_k, scope = c['bottleneck_k'], c['bottleneck_scope']
    n = num_tokens(c, image_shape, question_dim)
    in_scope = n if scope == 'example' else (n * batch_size if batch_size else None)
    if top_k is None or top_k < 1 or (in_scope is not None and top_k > in_scope):
      where = ('the tokens of one image' if scope == 'example' else
               f'the {in_scope} tokens of a batch of {batch_size}')
      raise errors.ConfigError(
          f'model.bottleneck_k={top_k} must be between 1 and {in_scope}, {where} '
          f'(bottleneck_scope {scope!r}).')


def num_tokens(cfg: Mapping, image_shape, question_dim: int = 0) -> int:
  """Tokens per image that reach the blocks: patches, plus the question and CLS tokens if any."""
  h, w = image_shape[:2]
  return ((h // cfg['patch_size']) * (w // cfg['patch_size']) + (1 if question_dim else 0)
          + (1 if cfg['head'] == 'cls' else 0))


def create_model(cfg: Mapping | str = 'small', *, num_classes: int, image_shape,
                 question_dim: int = 0, batch_size: int | None = None, **overrides) -> AiT:
  """Builds AiT (or its ViT baseline) from model config fields, after validating them.

  cfg: a preset name or a mapping with fields of `default_config()` (missing ones default).
  image_shape: (H, W[, C]) of the images the model sees. batch_size: the training batch, which
  bounds `bottleneck_k` in scope 'batch'. Every invalid value raises one ValueError naming its field.
  """
  c = resolve(cfg, **overrides)
  validate(c, image_shape=image_shape, question_dim=question_dim, batch_size=batch_size)
  ws_names = _workspace_fields()
  c.pop('preset')
  c['param_init'] = c.pop('init')
  workspace = {k: c.pop(k) for k in ws_names}
  return AiT(num_classes=num_classes, workspace=workspace, **c)
