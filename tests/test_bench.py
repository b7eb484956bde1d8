"""The speed benchmark: its FLOP counter against a hand count, and the CLI end to end on CPU."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from ait_jax import bench
from ait_jax import models
from conftest import limit

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Tiny CIFAR-shaped case: B=16 images of 32×32×3, patch 4 -> N=64 tokens, T=B·N=1024, D=64,
# F=128, one 64-dim head, depth 1, 10 classes; workspace M=32, Dm=32, Hm=8, k=64.
TINY = dict(depth=1, width=64, mlp_dim=128, num_heads=1, bottleneck_k=64)
B, N, T, D, F, PC, CLASSES = 16, 64, 1024, 64, 128, 4 * 4 * 3, 10
M, DM, HM, K = 32, 32, 8, 64

# Hand count of one forward pass, 2 FLOPs per multiply-add.
VIT_FORWARD = (2 * T * PC * D  # patch embedding
               + 2 * T * D * 3 * D  # qkv
               + 2 * 2 * B * N * N * D  # scores and weighted sum (one head of 64 = D)
               + 2 * T * D * D  # attention output
               + 2 * 2 * T * D * F  # FFN
               + 2 * B * N * D * CLASSES)  # flatten head
WORKSPACE_FORWARD = (2 * M * DM * HM * DM  # memory queries
                     + 2 * 2 * T * D * HM * DM  # keys and values of every token
                     + 2 * HM * M * T * DM  # bottleneck logits
                     + 2 * HM * M * K * DM  # gather-read of the k kept tokens
                     + 2 * M * HM * DM * DM  # write output projection
                     + 2 * M * DM * D  # prior up-projection
                     + 2 * 2 * T * M * D)  # Hopfield: scores and read


def _model(**overrides):
  return models.create_model({**TINY, **overrides}, num_classes=CLASSES, image_shape=(32, 32, 3),
                             batch_size=B)


def test_flop_counter_matches_hand_count():
  assert VIT_FORWARD == 91_488_256 and WORKSPACE_FORWARD == 94_502_912
  vit = bench.forward_flops(_model(vit=True), B, (32, 32, 3))
  ait = bench.forward_flops(_model(), B, (32, 32, 3))
  assert vit == {'backbone': VIT_FORWARD, 'workspace': 0, 'total': VIT_FORWARD}
  assert ait == {'backbone': VIT_FORWARD, 'workspace': WORKSPACE_FORWARD,
                 'total': VIT_FORWARD + WORKSPACE_FORWARD}
  assert bench.train_step_flops(_model(), B, (32, 32, 3)) == 3 * (VIT_FORWARD + WORKSPACE_FORWARD)
  # Scope 'example': B groups each keep k tokens per slot, so the gather-read grows B-fold.
  example = bench.forward_flops(_model(bottleneck_scope='example'), B, (32, 32, 3))
  assert example['workspace'] - WORKSPACE_FORWARD == (B - 1) * 2 * HM * M * K * DM


def _xla_forward_flops(model):
  """XLA's own FLOP count of the compiled training forward: a count independent of bench's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((B, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=True))
  fn = lambda v, x: model.apply(v, x, train=True, mutable=['memory'],
                                rngs={'dropout': jax.random.key(0)})
  cost = jax.jit(fn).lower(variables, x).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']


def test_flop_counter_agrees_with_xla():
  """The analytic count covers matmuls only; XLA also counts element-wise work, so it is a little
  higher, and the workspace's extra FLOPs agree within 15%."""
  vit, ait = _model(vit=True), _model()
  xla_vit, xla_ait = _xla_forward_flops(vit), _xla_forward_flops(ait)
  ours_vit = bench.forward_flops(vit, B, (32, 32, 3))['total']
  ours_ait = bench.forward_flops(ait, B, (32, 32, 3))['total']
  assert 0.8 < ours_vit / xla_vit <= 1.0 and 0.8 < ours_ait / xla_ait <= 1.0
  assert 0.85 < (xla_ait - xla_vit) / (ours_ait - ours_vit) < 1.15


def test_workspace_share_of_ait_small_at_cifar_batch_512():
  # docs/training.md#measured quotes the GWL at about 7% of a dense block; the matmul count gives 6–7% per step.
  model = models.create_model('small', num_classes=10, image_shape=(32, 32, 3), batch_size=512)
  f = bench.forward_flops(model, 512, (32, 32, 3))
  assert 0.06 < f['workspace'] / f['backbone'] < 0.07


def test_cli_compares_ait_and_vit(tmp_path, capsys):
  """The command in process (its flags, config and output); test_cli_rejects_too_many_devices
  runs `python -m ait_jax.bench` for real."""
  from ait_jax import cli  # pylint: disable=g-import-not-at-top
  out, hlo = tmp_path / 'bench.json', tmp_path / 'step.hlo'
  # The config route for the fields (as ait_jax.main), the --batch shortcut for the batch.
  argv = ['ait_jax.bench', f'--config={ROOT}/configs/cifar10.py:model=small',
          '--config.model.depth=1', '--config.model.width=64', '--config.model.mlp_dim=128',
          '--config.model.num_heads=1', '--config.model.bottleneck_k=64', f'--batch={B}',
          '--steps=3', '--warmup=1',
          '--devices=1', '--compare=vit', f'--json={out}', f'--dump_hlo={hlo}']
  with pytest.raises(SystemExit) as exit_info:
    cli.run(bench.define_flags, bench.main, argv)
  assert exit_info.value.code == 0, capsys.readouterr().err[-3000:]
  assert 'AiT/ViT throughput ratio' in capsys.readouterr().out
  result = json.loads(out.read_text())
  ait, vit = result['rows']
  assert (ait['arch'], vit['arch']) == ('ait', 'vit')
  for row in (ait, vit):
    assert row['images_per_s'] > 0 and row['ms_per_step_median'] > 0 and row['steps'] == 3
    assert row['devices'] == 1 and row['batch'] == B
    assert row['mfu'] is None  # no peak is assumed on CPU
  assert vit['analytic_flops_per_step'] == 3 * VIT_FORWARD
  assert ait['analytic_flops_per_step'] == 3 * (VIT_FORWARD + WORKSPACE_FORWARD)
  assert ait['analytic_flops_per_step'] - vit['analytic_flops_per_step'] == 3 * WORKSPACE_FORWARD
  assert result['ait_over_vit_images_per_s'] == ait['images_per_s'] / vit['images_per_s']
  assert result['hardware']['platform'] == 'cpu'
  assert 'HloModule jit_train_step' in hlo.read_text()
  assert (tmp_path / 'step.hlo.vit').exists()


def test_cli_rejects_too_many_devices(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'ait_jax.bench', '--devices=64'], cwd=tmp_path,
                        capture_output=True, text=True, timeout=limit(),
                        env={**os.environ, 'PYTHONPATH': str(ROOT)})
  assert proc.returncode == 2 and proc.stderr.strip().endswith('devices JAX sees.')


DEVICES = 4  # enough to show what grows with the batch; BENCHMARKS.md has the 8-device table


def _collectives(selection: str, batch: int) -> dict:
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  c = load_config('cifar10')
  c.model.update(preset='small', **TINY, selection=selection)
  c.batch_size = c.eval_batch_size = batch
  c.mesh.data, c.mesh.model = -1, 1
  return bench.collective_report(c, jax.devices()[:DEVICES])


def test_sharded_selection_communication_does_not_grow_with_the_batch():
  small, large = _collectives('sharded', 16), _collectives('sharded', 64)
  shapes = lambda r: [(op['op'], op['shape'], op['bytes']) for op in r['collectives']]
  assert shapes(small) == shapes(large)  # every collective, one by one
  workspace = large['bytes_per_scope']['block0/workspace']
  assert workspace == small['bytes_per_scope']['block0/workspace']
  # The candidate values: [Hm, M, DEVICES·k] float32 on each device.
  assert any(op['op'] == 'all-gather' and op['bytes'] == HM * M * DEVICES * K * 4
             for op in large['collectives'])
  # 'full' leaves the top-k to XLA, which all-gathers every logit: grows 4× with the batch.
  full = _collectives('full', 64)['bytes_per_scope']['block0/workspace']
  assert full >= HM * M * 64 * N * 4 > workspace


def test_collectives_parser_reads_shapes_bytes_and_scopes():
  hlo = '\n'.join([
      '  %all-gather.1 = f32[8,32,4096]{1,0,2} all-gather(%x), dimensions={2}, '
      'metadata={op_name="jit(train_step)/jvp(AiT)/block3/workspace/shard_map"}',
      '  %ar = (f32[8]{0}, bf16[2,2]{1,0}) all-reduce(%a, %b), to_apply=%add, '
      'metadata={op_name="jit(train_step)/transpose(jvp(AiT))/block0/ffn/fc1/dot_general"}',
      '  %add.2 = f32[8]{0} add(%p, %q)',
      '  %rs = s32[16]{0} reduce-scatter(%c), dimensions={0}'])
  ops = bench.collectives(hlo)
  assert [(o['op'], o['bytes'], o['scope']) for o in ops] == [
      ('all-gather', 8 * 32 * 4096 * 4, 'block3/workspace'),
      ('all-reduce', 8 * 4 + 2 * 2 * 2, 'block0'), ('reduce-scatter', 64, 'other')]


# Lines of the train step of configs/triangle.py:quick compiled by libtpu 0.0.42.1 for v5e-4
# (backend_config cut), and two async ops in XLA's text syntax.
TPU_HLO = '''
%fused_computation.685 (param_0.2287: f32[8,32,64]) -> (f32[8,32,64], f32[8,32,256]) {
  %all-gather.5 = f32[8,32,256]{1,2,0:T(8,128)} all-gather(%param_0.2287), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={2}, use_global_device_ids=true, frontend_attributes={chain_id="0"}, metadata={op_name="jit(train_step)/jvp(AiT)/block0/workspace/shard_map/all_gather_invariant" stack_frame_id=174}
  ROOT %custom-call.9 = (f32[8,32,64]{1,2,0:T(8,128)S(1)}, f32[8,32,256]{1,2,0:T(8,128)S(1)}) custom-call(%all-gather.5), custom_call_target="AsyncCollectiveStart"
}
%async_collective_fusion.355 (param_0.2291: f32[8,32,64]) -> f32[8,32,256] {
  ROOT %all-gather.7 = f32[8,32,256]{1,2,0:T(8,128)S(1)} all-gather(%param_0.2291), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={2}, use_global_device_ids=true, frontend_attributes={chain_id="0"}, metadata={op_name="jit(train_step)/jvp(AiT)/block0/workspace/shard_map/all_gather_invariant" stack_frame_id=174}
}
%fused_computation.687 (param_0.2293: f32[8,32,64]) -> f32[8,32,256] {
  %all-gather.9 = f32[8,32,256]{1,2,0:T(8,128)} all-gather(%param_0.2293), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={2}, use_global_device_ids=true, frontend_attributes={chain_id="0"}, metadata={op_name="jit(train_step)/jvp(AiT)/block0/workspace/shard_map/all_gather_invariant" stack_frame_id=174}
  ROOT %custom-call.11 = f32[8,32,256]{1,2,0:T(8,128)S(1)} custom-call(%param_0.2293, %all-gather.9), custom_call_target="AsyncCollectiveDone"
}
ENTRY %main.1_spmd (param: f32[3072,64]) -> f32[] {
  %reduce.382 = f32[8]{0:T(128)S(1)} reduce(%reshape.569, %constant.292.clone), dimensions={1}, to_apply=%region_68.72, metadata={op_name="jit(train_step)/jvp(AiT)/block0/workspace/jit(_var)/reduce_sum" stack_frame_id=210}
  %fusion.71 = f32[3072,64]{0,1:T(8,128)S(1)} fusion(%param.1, %param.2), kind=kOutput, calls=%fused_computation.70, metadata={op_name="jit(train_step)/transpose(jvp(AiT))/patch_embed/dot_general" stack_frame_id=309}
  %all-reduce.37 = (f32[3072,64]{0,1:T(8,128)S(1)}, /*index=1*/f32[8]{0:T(128)S(1)}) all-reduce(%fusion.71, /*index=1*/%reduce.382), channel_id=3, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%region_33.36, metadata={op_name="jit(train_step)/transpose(jvp(AiT))/patch_embed/dot_general" stack_frame_id=309}
  %ags = (f32[4,8]{1,0}, f32[16,8]{1,0}) all-gather-start(%x), replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done(%ags)
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%y), source_target_pairs={{0,1},{1,0}}
  ROOT %cpd = f32[8]{0} collective-permute-done(%cps)
}
'''


def test_collectives_parser_reads_tpu_async_chains_and_combined_all_reduces():
  # A parameter of 3072·64 values, summed by XLA as f32[3072,64] whatever its own shape.
  ops = bench.collectives(TPU_HLO, param_shapes={(3072 * 64,)})
  assert [(o['op'], o['name'], o['bytes'], o['scope']) for o in ops] == [
      # XLA:TPU's async collective fusion: start, step and done of one all-gather (chain 0).
      ('all-gather', 'all-gather.5', 8 * 32 * 256 * 4, 'block0/workspace'),
      # One all-reduce carrying a parameter's gradient and a workspace sum, split by operand.
      ('all-reduce', 'all-reduce.37', 3072 * 64 * 4, 'parameter gradients'),
      ('all-reduce', 'all-reduce.37', 8 * 4, 'block0/workspace'),
      ('all-gather', 'ags', 16 * 8 * 4, 'other'), ('collective-permute', 'cps', 8 * 4, 'other')]
  by_scope = bench.collective_totals(ops, 'scope')
  assert by_scope['block0/workspace'] == {'bytes': 8 * 32 * 256 * 4 + 8 * 4, 'ops': 2}
  all_reduce = bench.collective_totals(ops, 'op')['all-reduce']
  assert all_reduce == {'bytes': (3072 * 64 + 8) * 4, 'ops': 1}
  # Without parameter shapes nothing is a gradient: the sum keeps the scope of its producer.
  assert {o['scope'] for o in bench.collectives(TPU_HLO)} == {'block0/workspace', 'other'}
