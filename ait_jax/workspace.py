"""The global workspace's math as pure, jittable functions (docs/model.md#memory-write).

Modules in `models.py` call these; tests check them against NumPy float64. Nothing here holds state.

Four exact ways to pick each slot's top-k tokens of scope 'batch' (see `SELECTIONS`), which all
pick the same tokens: values descending, ties to the lower token index (`lax.top_k`'s rule).
- 'full' runs `lax.top_k` over all T tokens (the reference); on a mesh, XLA gathers every logit.
- 'chunked' takes the top-k of C chunks, then the top-k of their union (one device): a token in
  the global top-k is necessarily in the top-k of its own chunk.
- 'sharded' does the same with one chunk per device of the mesh axis 'data': the devices exchange
  their k candidates per head and slot, so nothing grows with the global batch, but the exchange
  grows with the devices.
- 'threshold' finds each row's k-th largest (logit, token) key by a radix select whose rounds
  exchange only per-row histograms; each device then keeps its own tokens above it. Nothing it
  exchanges grows with the batch or with the devices; it costs more rounds (latency) instead.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ait_jax import errors
from ait_jax.sharding import DATA as DATA_AXIS  # the mesh axis the batch is split over

CV_EPS = 1e-10  # docs/model.md#balance-loss: cv² = var / (mean² + 1e-10)
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
SELECTIONS = ('auto', 'full', 'chunked', 'sharded', 'threshold')


class BottleneckOutput(NamedTuple):
  """What one bottleneck read returns.

  read:       [Hm, M, Dh] per head, the gated sum of values read by every memory slot.
  indices:    [G, Hm, M, k] token index (within its group) of each kept logit; None when dense.
  weights:    [G, Hm, M, k] softmax gates of the kept logits (divided by G); dense: [G, Hm, M, n].
  importance: [Hm, T] Σ over slots of the gates each token received (T = G·n).
  load:       [Hm, T] number of slots whose top-k holds the token (a count: no gradient).
  """
  read: jax.Array
  indices: jax.Array | None
  weights: jax.Array
  importance: jax.Array
  load: jax.Array


def bottleneck_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                         top_k: int | None, selection: str = 'full',
                         num_chunks: int | None = None, mesh=None,
                         token_mask: jax.Array | None = None) -> BottleneckOutput:
  """Bottleneck attention read: memory slots attend to their top-k tokens only (docs/model.md#memory-write).

  Args:
    queries: [Hm, M, Dh] memory queries per head.
    keys, values: [G, Hm, n, Dh]. G groups of n tokens compete separately: G = 1 and n = B·N for
      the faithful scope 'batch' (all tokens of the batch squashed into one sequence), G = B and
      n = N for scope 'example'. Every group is read with its own softmax and the G reads are
      averaged, so each slot's gates still sum to 1 over all T = G·n tokens.
    top_k: tokens kept per head, slot and group; None keeps all (dense cross-attention, the
      'without bottleneck' ablation of docs/model.md#ablations).
    selection: how the top-k is found, one of `SELECTIONS` less 'auto' (see the module docstring);
      all give the same tokens. 'sharded' and 'threshold' need G = 1 and a mesh with a 'data'
      axis (`mesh`, or the one set by `jax.set_mesh`).
    num_chunks: chunks of 'chunked' (default `default_chunks`); must divide n.
    token_mask: optional [G, n] bool, False for tokens that take no part in the write (the zero
      padding of an evaluation batch). See `_logits` and `_gates`: they are never preferred to a
      real token, get no gate, and the reads are averaged over the groups that hold real tokens,
      so the read equals that of the real tokens alone. The balance loss is not corrected: its
      importance and load still span all T tokens.

  Logits are q·kᵀ/√Dh; selection and softmax run in float32 whatever the input dtype, so bf16 runs
  pick the same tokens as float32 ones up to rounding of the logits.
  """
  num_groups, num_heads, n, head_dim = keys.shape
  num_slots = queries.shape[1]
  if top_k is None:
    logits = _logits(queries, keys, token_mask)
    gates = _gates(logits, _averaged_groups(num_groups, token_mask),
                   token_mask is not None)  # [G, Hm, M, n]
    read = jnp.einsum('ghmn,ghnd->hmd', gates.astype(values.dtype), values)
    importance = gates.sum(axis=2)  # [G, Hm, n]
    load = jnp.full_like(importance, num_slots)
    to_tokens = lambda a: jnp.moveaxis(a, 0, 1).reshape(num_heads, num_groups * n)
    return BottleneckOutput(read, None, gates, to_tokens(importance), to_tokens(load))

  if not 0 < top_k <= n:
    raise errors.ConfigError(
        f'bottleneck_k={top_k} must be in [1, {n}], the tokens each slot competes '
        'over; lower bottleneck_k or raise the batch size.')
  if selection not in SELECTIONS[1:]:
    raise errors.ConfigError(f'selection={selection!r} must be one of {SELECTIONS[1:]}.')
  if selection == 'sharded':
    return sharded_bottleneck_attention(queries, keys, values, top_k, mesh, token_mask)
  if selection == 'threshold':
    return threshold_bottleneck_attention(queries, keys, values, top_k, mesh, token_mask)
  logits = _logits(queries, keys, token_mask)
  if selection == 'chunked':
    chunks = default_chunks(n, top_k) if num_chunks is None else num_chunks
    kept, indices = chunked_top_k(logits, top_k, chunks)
  else:
    kept, indices = jax.lax.top_k(logits, top_k)  # [G, Hm, M, k]; exactly k even with ties
  weights = _gates(kept, _averaged_groups(num_groups, token_mask), token_mask is not None)
  read, importance, load = jax.vmap(_read_own_tokens, in_axes=(0, 0, 0, None))(
      weights, indices, values, n)
  to_tokens = lambda a: jnp.moveaxis(a, 0, 1).reshape(num_heads, num_groups * n)
  return BottleneckOutput(read.sum(0).astype(values.dtype), indices, weights,
                          to_tokens(importance), jax.lax.stop_gradient(to_tokens(load)))


def _logits(queries: jax.Array, keys: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
  """[G, Hm, M, n] float32 logits q·kᵀ/√Dh; -inf for the tokens `token_mask` [G, n] leaves out,
  so that every selection ranks them below any real token."""
  head_dim = keys.shape[-1]
  logits = jnp.einsum('hmd,ghnd->ghmn', queries, keys,
                      preferred_element_type=jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
  if token_mask is None:
    return logits
  return jnp.where(token_mask[:, None, None, :], logits, -jnp.inf)


def _averaged_groups(num_groups: int, token_mask: jax.Array | None):
  """How many group reads are averaged: all G, or with a token mask those holding a real token
  (a padded image in scope 'example' holds none)."""
  if token_mask is None:
    return num_groups
  return jnp.maximum(jnp.sum(jnp.any(token_mask, axis=-1)), 1).astype(jnp.float32)


def _gates(logits: jax.Array, divisor, masked: bool) -> jax.Array:
  """Softmax over the last axis, divided by `divisor`. With a token mask (`masked`), the -inf
  logits of masked tokens (kept when fewer than k real tokens exist) get gate 0, and a row with
  no real token gets 0 everywhere; no NaN arises, in value or gradient."""
  if not masked:
    return jax.nn.softmax(logits, axis=-1) / divisor
  real = jnp.isfinite(logits)
  lowest = jnp.finfo(logits.dtype).min  # exp(lowest - max) is 0 beside any real logit
  return jax.nn.softmax(jnp.where(real, logits, lowest), axis=-1) * real / divisor


def _read_own_tokens(weights, indices, values, n_own: int):
  """Read, importance and load from the kept tokens that lie in `values` ([Hm, n_own, Dh]).

  weights, indices: [Hm, M, k]; indices count from the first token of `values`, and those outside
  [0, n_own) (tokens of another device) contribute nothing. The read is accumulated in float32 so
  that summing partial reads over devices rounds like one read.
  Returns read [Hm, M, Dh] float32, importance and load [Hm, n_own] float32.
  """
  num_heads, num_slots, top_k = indices.shape
  mine = (indices >= 0) & (indices < n_own)
  flat_idx = jnp.where(mine, indices, 0).reshape(num_heads, num_slots * top_k)
  own_w = jnp.where(mine, weights, 0.0)
  picked = jnp.take_along_axis(values, flat_idx[..., None], axis=1)  # [Hm, M·k, Dh]
  picked = picked.reshape(num_heads, num_slots, top_k, -1)
  read = jnp.einsum('hmk,hmkd->hmd', own_w.astype(values.dtype), picked,
                    preferred_element_type=jnp.float32)

  def scatter(idx, w):  # idx, w: [M·k] -> per-token sums [n_own]
    return jnp.zeros((n_own,), jnp.float32).at[idx].add(w)

  importance = jax.vmap(scatter)(flat_idx, own_w.reshape(flat_idx.shape))
  load = jax.vmap(scatter)(flat_idx, mine.astype(jnp.float32).reshape(flat_idx.shape))
  return read, importance, load


def merge_candidates(values: jax.Array, indices: jax.Array, top_k: int):
  """Top-k of candidate (value, token index) pairs along the last axis.

  The candidates must be ordered so that equal values appear in increasing token index (true for
  a concatenation, in token order, of `lax.top_k` results of consecutive token ranges); then
  `lax.top_k`'s rule, ties to the lower position, sends ties to the lower token index.
  """
  kept, pos = jax.lax.top_k(values, top_k)
  return kept, jnp.take_along_axis(indices, pos, axis=-1)


def default_chunks(n: int, top_k: int) -> int:
  """Chunks for 'chunked': the most that divide n while each still holds at least 4·k tokens
  (fewer, larger chunks leave less to merge); 1 when n < 8·k."""
  most = max(1, n // (4 * top_k))
  return max(c for c in range(1, most + 1) if n % c == 0)


def chunked_top_k(x: jax.Array, top_k: int, num_chunks: int):
  """`lax.top_k(x, top_k)` (values and indices, same order) via the top-k of `num_chunks` equal
  chunks of the last axis, then the top-k of their union."""
  *lead, n = x.shape
  if num_chunks < 1 or n % num_chunks:
    raise errors.ConfigError(f'num_chunks={num_chunks} must divide the {n} tokens.')
  size = n // num_chunks
  local_k = min(top_k, size)
  vals, idx = jax.lax.top_k(x.reshape(*lead, num_chunks, size), local_k)
  idx = idx + (jnp.arange(num_chunks, dtype=idx.dtype) * size)[:, None]
  flat = lambda a: a.reshape(*lead, num_chunks * local_k)
  return merge_candidates(flat(vals), flat(idx), top_k)


def data_mesh(mesh=None):
  """The mesh 'sharded' splits over: `mesh`, else the one set by `jax.set_mesh`; None without a
  'data' axis."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty or DATA_AXIS not in mesh.axis_names:
    return None
  return mesh


# 'auto' on one device: the faster of 'full' and 'chunked' as measured on CPU (BENCHMARKS.md,
# "Exact top-k selections"); GPUs may differ and are unmeasured.
SINGLE_DEVICE_AUTO = 'full'
# 'auto' across devices (BENCHMARKS.md §6, compiled for TPU v5e): 'sharded' exchanges Hm·M·k
# candidates per device in 5 collectives per layer (2.5 MiB at 4 chips, 8.5 at 16, 128 at 256 for
# AiT-Small), 'threshold' about 0.2 MiB at any size in about 18 collectives. At an all-reduce
# latency of ~10 µs and 50–100 GB/s per chip, the 13 extra rounds cost what 6–13 MiB cost to
# move: 'sharded' up to this many devices on the data axis, 'threshold' beyond.
SHARDED_MAX_DEVICES = 8


def resolve_selection(selection: str, num_groups: int, n: int, top_k: int | None,
                      mesh=None) -> str:
  """The selection 'auto' stands for. Scope 'batch' under a mesh whose 'data' axis has several
  devices: 'sharded' up to SHARDED_MAX_DEVICES of them (few rounds, a few MiB), 'threshold'
  beyond (per-row counts only, whatever the devices); neither grows with the batch. Otherwise
  the faster single-device one. Scope 'example' and the dense write need no selection across
  devices."""
  if selection != 'auto':
    return selection
  if top_k is None or num_groups != 1:
    return 'full'
  found = data_mesh(mesh)
  shards = found.shape[DATA_AXIS] if found is not None else 1
  if shards > 1 and n % shards == 0:
    return 'sharded' if shards <= SHARDED_MAX_DEVICES else 'threshold'
  return SINGLE_DEVICE_AUTO


def _data_shards(keys, mesh, selection: str):
  """(mesh, devices of 'data') for a selection across devices; one sentence for what cannot work."""
  num_groups, _, n, _ = keys.shape
  found = data_mesh(mesh)
  if found is None:
    raise errors.ConfigError(f"selection='{selection}' needs a mesh with a 'data' axis: call under "
                             "jax.set_mesh(mesh) (the Trainer does) or choose selection='full'.")
  if num_groups != 1:
    raise errors.ConfigError(
        f"selection='{selection}' is for scope 'batch' (one group of all tokens); "
        "scope 'example' needs no cross-device selection: use selection='full'.")
  shards = found.shape[DATA_AXIS]
  if n % shards:
    raise errors.ConfigError(
        f'The {n} tokens of the batch must split evenly over the {shards} devices '
        "of mesh axis 'data'; pick a batch size divisible by them.")
  return found, shards


def sharded_bottleneck_attention(queries, keys, values, top_k: int, mesh=None,
                                 token_mask=None) -> BottleneckOutput:
  """`bottleneck_attention` of one group (scope 'batch') with its tokens split over 'data'.

  Each device takes the top-k of its own tokens, the devices all-gather these candidates' values
  ([Hm, M, k] each), and every device takes the same global top-k and softmax from them; a
  winner's position among the candidates tells which device owns it and which of its tokens.
  Each device then reads, and counts importance and load for, the winners that are its own
  tokens; the partial reads are summed (psum [Hm, M, Dh]). Importance and load stay
  split over 'data' like the tokens; the balance loss's means and variances over them reduce
  [Hm]-sized partial sums. No communication grows with the batch. `token_mask` [1, n] is split
  like the tokens (see `bottleneck_attention`).
  """
  found, shards = _data_shards(keys, mesh, 'sharded')
  n = keys.shape[2]
  n_own = n // shards
  local_k = min(top_k, n_own)

  def per_device(q, k, v, *mask):  # k, v: [1, Hm, n_own, Dh], mask: [1, n_own], this device's
    me = jax.lax.axis_index(DATA_AXIS)
    q = jax.lax.pcast(q, DATA_AXIS, to='varying')  # float32: see the note below
    own_mask = mask[0] if mask else None
    vals, idx = jax.lax.top_k(_logits(q, k, own_mask)[0], local_k)  # [Hm, M, local_k]
    # Only the candidate values travel. The tiled gather concatenates the devices in order, so
    # equal values sit in global token order and the top-k's ties go to the lower token index.
    all_vals = jax.lax.all_gather(vals, DATA_AXIS, axis=2, tiled=True, to='invarying')
    kept, pos = jax.lax.top_k(all_vals, top_k)  # [Hm, M, k], pos in [0, shards·local_k)
    weights = _gates(kept, 1, own_mask is not None)
    own = jnp.take_along_axis(idx, pos % local_k, axis=-1)
    own = jnp.where(pos // local_k == me, own, -1)  # -1: another device's token
    read, importance, load = _read_own_tokens(weights, own, v[0], n_own)
    # Global indices are an output only (figures, tests): XLA drops this gather when unused.
    offset = (me * n_own).astype(idx.dtype)
    all_idx = jax.lax.all_gather(idx + offset, DATA_AXIS, axis=2, tiled=True, to='invarying')
    indices = jnp.take_along_axis(all_idx, pos, axis=-1)
    return jax.lax.psum(read, DATA_AXIS), indices[None], weights[None], importance, load

  return _over_data(per_device, found, queries, keys, values, token_mask)


def _over_data(per_device, mesh, queries, keys, values, token_mask) -> BottleneckOutput:
  """Runs `per_device(q, k, v[, mask]) -> (read, indices, weights, importance, load)` with the
  tokens (and `token_mask` [1, n], when given) split over 'data' (shard_map); read, indices and
  weights come out replicated, importance and load split like the tokens."""
  tokens = P(None, None, DATA_AXIS, None)
  # The queries enter as float32, marked per-device before use: products of bfloat16 numbers are
  # exact in float32, so the logits are those of the other selections, and each device's part of
  # the queries' gradient stays float32 until the psum (one bfloat16 rounding, as with 'full').
  # Summing bfloat16 parts instead would round twice, and XLA:CPU (jax 0.10.2) aborts promoting
  # such a bfloat16 all-reduce.
  masks = () if token_mask is None else (token_mask,)
  read, indices, weights, importance, load = jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(), tokens, tokens) + (P(None, DATA_AXIS),) * len(masks),
      out_specs=(P(), P(), P(), P(None, DATA_AXIS), P(None, DATA_AXIS)),
      axis_names={DATA_AXIS})(queries.astype(jnp.float32), keys, values, *masks)
  return BottleneckOutput(read.astype(values.dtype), indices, weights, importance,
                          jax.lax.stop_gradient(load))


RADIX_BITS = 4  # bits of the key decided per round of 'threshold': a [Hm, M, 16] histogram each


def order_key(x: jax.Array) -> jax.Array:
  """uint32 keys in the total order `lax.top_k` sorts float32 by (-NaN < -inf < ... < -0 < +0 <
  ... < +inf < NaN): flip the sign bit of positives, every bit of negatives."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def radix_select(words, top_k: int, widths, count_sum=lambda c: c) -> jax.Array:
  """The mask of the `top_k` largest keys of each row: exactly top_k per row, keys unique.

  words: uint32 arrays [..., n], the key's words from the most significant, of `widths` bits
  each; the key (word 0, word 1, ...) must differ between any two entries of a row. Each round
  decides RADIX_BITS more bits of the top_k-th largest key from a histogram of the digits of the
  entries that still match it, summed by `count_sum` (a psum over devices for 'threshold');
  entries above it are kept as soon as a digit puts them above.
  """
  bins = 2 ** RADIX_BITS
  alive = jnp.ones(words[0].shape, bool)  # still equal to the threshold key so far
  kept = jnp.zeros(words[0].shape, bool)
  need = jnp.full(words[0].shape[:-1], top_k, jnp.int32)  # of the alive ones, how many to keep
  for word, width in zip(words, widths):
    for shift in range(-(-width // RADIX_BITS) * RADIX_BITS - RADIX_BITS, -1, -RADIX_BITS):
      digit = ((word >> shift) & (bins - 1)).astype(jnp.int32)
      hist = count_sum(jnp.sum((digit[..., None] == jnp.arange(bins)) & alive[..., None],
                               axis=-2, dtype=jnp.int32))  # [..., bins]
      at_least = jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]  # alive with digit >= b
      chosen = jnp.sum(at_least >= need[..., None], axis=-1) - 1  # the threshold's digit
      chosen_count = jnp.take_along_axis(hist, chosen[..., None], -1)[..., 0]
      above = jnp.take_along_axis(at_least, chosen[..., None], -1)[..., 0] - chosen_count
      kept |= alive & (digit > chosen[..., None])
      alive &= digit == chosen[..., None]
      need -= above
  return kept | alive  # the one entry equal to the threshold key


def threshold_bottleneck_attention(queries, keys, values, top_k: int, mesh=None,
                                   token_mask=None) -> BottleneckOutput:
  """`bottleneck_attention` of one group (scope 'batch') with its tokens split over 'data',
  communicating per-row counts only.

  Every token has the key (its logit's order bits, T − 1 − its global index): keys are unique,
  and their order is `lax.top_k`'s, ties to the lower index. `radix_select` finds which tokens
  hold the k largest keys in 8 + ⌈log2 T / 4⌉ rounds, each a psum of [Hm, M, 16] counts; each
  device keeps its own tokens among them. The softmax's max and normaliser are a pmax and a psum
  of [Hm, M]; the read is a psum of [Hm, M, Dh]; importance and load stay split over 'data', as
  with 'sharded'. None of these grows with the batch or with the devices. `token_mask` [1, n] is
  split like the tokens (see `bottleneck_attention`).
  """
  found, shards = _data_shards(keys, mesh, 'threshold')
  n = keys.shape[2]
  n_own = n // shards
  index_bits = max(n - 1, 0).bit_length()

  def per_device(q, k, v, *mask):  # k, v: [1, Hm, n_own, Dh], mask: [1, n_own], this device's
    me = jax.lax.axis_index(DATA_AXIS)
    q = jax.lax.pcast(q, DATA_AXIS, to='varying')
    logits = _logits(q, k, mask[0] if mask else None)[0]  # [Hm, M, n_own] float32
    token = me * n_own + jnp.arange(n_own)
    inverted = jnp.broadcast_to((n - 1 - token).astype(jnp.uint32), logits.shape)
    kept = radix_select([order_key(jax.lax.stop_gradient(logits)), inverted], top_k,
                        [32, index_bits], lambda c: jax.lax.psum(c, DATA_AXIS))
    # Masked tokens (-inf) are kept only when fewer than k real ones exist; they get no gate,
    # and a row without any real token reads nothing (no NaN in value or gradient).
    real = kept & jnp.isfinite(logits)
    lowest = jnp.finfo(jnp.float32).min
    top = jax.lax.pmax(jax.lax.stop_gradient(jnp.where(real, logits, lowest).max(-1)),
                       DATA_AXIS)[..., None]  # no gradient: softmax ignores a shift
    e = jnp.where(real, jnp.exp(jnp.where(real, logits, top) - top), 0.0)
    total = jax.lax.psum(e.sum(-1), DATA_AXIS)[..., None]
    gates = e / jnp.where(total > 0, total, 1.0)  # [Hm, M, n_own]
    read = jnp.einsum('hmn,hnd->hmd', gates.astype(v.dtype), v[0],
                      preferred_element_type=jnp.float32)
    importance, load = gates.sum(1), kept.sum(1).astype(jnp.float32)  # [Hm, n_own]
    # The kept tokens in top-k order are an output only (figures, tests): XLA drops these gathers
    # when unused. They come from `kept`, so a wrong selection shows as other indices; the keys
    # as int32 keep their order, and every token not kept ranks below every kept one.
    rank = jax.lax.bitcast_convert_type(order_key(logits) ^ jnp.uint32(1 << 31), jnp.int32)
    rank = jnp.where(kept, rank, jnp.iinfo(jnp.int32).min)
    all_rank = jax.lax.all_gather(rank, DATA_AXIS, axis=2, tiled=True, to='invarying')
    _, indices = jax.lax.top_k(all_rank, top_k)
    all_gates = jax.lax.all_gather(gates, DATA_AXIS, axis=2, tiled=True, to='invarying')
    weights = jnp.take_along_axis(all_gates, indices, axis=-1)
    return (jax.lax.psum(read, DATA_AXIS), indices[None], weights[None], importance, load)

  return _over_data(per_device, found, queries, keys, values, token_mask)


def dense_gates(out: BottleneckOutput) -> jax.Array:
  """The gate matrix G_h ∈ R^{M×T} of docs/model.md#memory-write as a dense [Hm, M, T] array (tests, figures)."""
  if out.indices is None:
    g, h, m, n = out.weights.shape
    return jnp.moveaxis(out.weights, 0, 2).reshape(h, m, g * n)
  g, h, m, _ = out.indices.shape
  n = out.importance.shape[1] // g

  def one(idx, w):  # [M, k] -> [M, n]
    return jax.vmap(lambda i, v: jnp.zeros((n,), w.dtype).at[i].add(v))(idx, w)

  gates = jax.vmap(jax.vmap(one))(out.indices, out.weights)  # [G, Hm, M, n]
  return jnp.moveaxis(gates, 0, 2).reshape(h, m, g * n)


def cv_squared(x: jax.Array) -> jax.Array:
  """Squared coefficient of variation along the last axis: var (unbiased) / (mean² + 1e-10)."""
  x = x.astype(jnp.float32)
  return jnp.var(x, axis=-1, ddof=1) / (jnp.mean(x, axis=-1) ** 2 + CV_EPS)


def balance_loss(importance: jax.Array, load: jax.Array, coef: float = 0.01) -> jax.Array:
  """Bottleneck balance loss of one layer (docs/model.md#balance-loss): coef · Σ_heads cv²(importance) + cv²(load).

  importance, load: [Hm, T]. load is a count and carries no gradient.
  """
  load = jax.lax.stop_gradient(load)
  return coef * jnp.sum(cv_squared(importance) + cv_squared(load))


def l2_normalize_rows(x: jax.Array) -> jax.Array:
  """Row-wise L2 normalisation, x / max(‖x‖, 1e-12) like torch's F.normalize."""
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
  return (x / jnp.maximum(norm, NORM_EPS)).astype(x.dtype)


def ema_write(memory: jax.Array, update: jax.Array, momentum: float = 0.9) -> jax.Array:
  """EMA memory write (docs/model.md#memory-write): rownorm_L2(momentum · memory + (1 − momentum) · update).

  Which side is stop-gradient'ed is the caller's choice (docs/model.md#gradient-flow, `gradient_mode`).
  """
  mixed = momentum * memory.astype(jnp.float32) + (1.0 - momentum) * update.astype(jnp.float32)
  return l2_normalize_rows(mixed)
