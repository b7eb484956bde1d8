"""The speed benchmark: its FLOP counter against a hand count, and the CLI end to end on CPU;
the GPU suite's smoke run and the profile summary."""
import gzip
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


def _tiny_config(**model):
  from tests.conftest import load_config  # pylint: disable=g-import-not-at-top
  c = load_config('cifar10')
  c.model.update(preset='small', **TINY, **model)
  c.batch_size = c.eval_batch_size = B
  c.mesh.data, c.mesh.model = -1, 1
  return c


def test_op_kinds_come_from_the_instruction_not_its_metadata():
  from ait_jax import profiling  # pylint: disable=g-import-not-at-top
  hlo = '\n'.join([
      '  %add_convert_fusion.3 = f32[8]{0} fusion(%dot.1, %b), kind=kLoop, calls=%fc, '
      'metadata={op_name="jit(train_step)/block0/mlp/dot_general"}',
      '  %custom-call.2 = (f32[4,8]{1,0}, s32[4,8]{1,0}) custom-call(%x), '
      'custom_call_target="__gpu$TopK", metadata={op_name="jit(train_step)/block1/workspace/top_k"}'])
  trace = {'traceEvents': [
      {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
      {'ph': 'X', 'pid': 1, 'name': 'loop_add_convert_fusion_kernel', 'dur': 30.0,
       'args': {'hlo_op': 'add_convert_fusion.3', 'hlo_module': 'jit_train_steps'}},
      {'ph': 'X', 'pid': 1, 'name': 'topk_kernel', 'dur': 50.0,
       'args': {'hlo_op': 'custom-call.2', 'hlo_module': 'jit_train_steps'}},
      {'ph': 'X', 'pid': 1, 'name': 'sm90_xmma_gemm_bf16', 'dur': 20.0,
       'args': {'hlo_module': 'jit_train_steps'}},  # a kernel the profiler did not map back
      # The host's launch of the same op: not counted when the device's events are there.
      {'ph': 'X', 'pid': 2, 'name': 'custom-call.2', 'dur': 5.0,
       'args': {'hlo_op': 'custom-call.2', 'hlo_module': 'jit_train_steps'}}]}
  assert sorted(profiling.op_events(trace)) == [
      ('add_convert_fusion.3', 'loop_add_convert_fusion_kernel', 'jit_train_steps', 30.0),
      ('custom-call.2', 'topk_kernel', 'jit_train_steps', 50.0),
      ('sm90_xmma_gemm_bf16', 'sm90_xmma_gemm_bf16', 'jit_train_steps', 20.0)]
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as d:
    with gzip.open(os.path.join(d, 'host.trace.json.gz'), 'wt') as f:
      json.dump(trace, f)
    summary = profiling.summarize(d, steps=2, hlo_text=hlo)
  by_op = {r['op']: r for r in summary['top_ops']}
  assert by_op['add_convert_fusion.3']['kind'] == 'elementwise / fusion'  # not 'matmul'
  assert by_op['custom-call.2']['kind'] == 'sort / top-k'
  assert by_op['sm90_xmma_gemm_bf16']['kind'] == 'matmul'
  assert by_op['custom-call.2']['scope'] == 'workspace'
  assert by_op['add_convert_fusion.3']['scope'] == 'transformer blocks'
  assert summary['ops_ms_per_step'] == pytest.approx(0.05)  # 100 µs over 2 steps
  assert summary['by_scope_ms'] == pytest.approx(
      {'workspace': 0.025, 'transformer blocks': 0.015, 'unknown': 0.01})


def test_help_shows_no_path_of_this_machine(capsys):
  from ait_jax import cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as exit_info:
    cli.run(bench.define_flags, bench.main, ['ait_jax.bench', '--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  config_help = out.split('--config:')[1].split('\n  --')[0]
  assert f'default {bench.DEFAULT_CONFIG}' in config_help
  assert str(ROOT) not in config_help and "(default: '/" not in config_help, config_help
  # The command still defaults to it.
  assert bench.with_default_config(['b', '--batch=8'])[1] == f'--config={bench.DEFAULT_CONFIG}'
  assert bench.with_default_config(['b', '--config=triangle']) == ['b', '--config=triangle']


def test_suite_flags_are_checked(capsys):
  from ait_jax import cli  # pylint: disable=g-import-not-at-top
  for argv, message in ((['--smoke'], '--smoke, --out and --budget_s go with --suite=gpu'),
                        (['--suite=gpu'], '--out is missing'),
                        (['--suite=gpu', '--out=x', '--budget_s=0'], 'must be a positive'),
                        (['--suite=gpu', '--out=x'], 'JAX sees cpu devices; add --smoke')):
    with pytest.raises(SystemExit) as exit_info:
      cli.run(bench.define_flags, bench.main, bench.with_default_config(['ait_jax.bench', *argv]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1, err


def test_suite_guard_skips_a_cell_that_would_overrun(tmp_path):
  from ait_jax import gpu_suite  # pylint: disable=g-import-not-at-top
  suite = gpu_suite.Suite(str(tmp_path), smoke=True, budget_s=60, steps=1, warmup=1,
                          command='test')
  suite.durations[('ait', 'base')] = 75.0  # the last AiT-Base cell took longer than what is left
  suite.run_cell('base', 'bfloat16', 512, False, 'full')
  suite.smoke = False  # a first ViT-Base cell: the guess for it (90 s) is what is compared
  suite.run_cell('base', 'bfloat16', 512, True, None)
  first, second = suite.result['skipped']
  assert first['skipped'].endswith('the last ait-base cell took 75 s'), first
  assert second['skipped'].endswith('a first vit-base cell is guessed at 90 s'), second
  assert not suite.result['cells']


def test_suite_targets():
  from ait_jax import gpu_suite  # pylint: disable=g-import-not-at-top
  cell = lambda arch, preset, dtype, batch, ips, selection='full': dict(
      arch=arch, preset=preset, dtype=dtype, batch=batch, images_per_s=ips,
      selection=None if arch == 'vit' else selection)
  cells = [cell('vit', 'small', 'bfloat16', 512, 50000), cell('ait', 'small', 'bfloat16', 512, 46000),
           cell('ait', 'small', 'bfloat16', 512, 40000, 'chunked'),
           cell('vit', 'small', 'bfloat16', 2048, 60000),
           cell('ait', 'small', 'bfloat16', 2048, 49000),  # the fastest, but 0.817 of its ViT
           cell('ait', 'small', 'float32', 512, 26000), {'arch': 'ait', 'preset': 'base',
                                                         'dtype': 'bfloat16', 'batch': 512,
                                                         'selection': 'full', 'error': 'OOM'}]
  ratio, fast, fp32, base = gpu_suite._targets(cells)  # pylint: disable=protected-access
  assert (ratio['value'], ratio['met'], ratio['where']) == (0.92, True, 'batch 512, full')
  assert (fast['value'], fast['met'], fast['where']) == (49000, True, 'batch 2048, full')
  assert (fp32['value'], fp32['met']) == (26000, True)
  assert (base['value'], base['met'], base['where']) == (None, None, 'not measured')


# Modules the GPU host lacks (the package is installed there without its dependencies).
_BLOCK_DATA_STACK = '''
import importlib.abc, sys
BLOCKED = {'tensorflow_datasets', 'grain', 'array_record', 'tensorflow', 'tensorboardX'}
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{name} is blocked: the GPU host lacks it')
sys.meta_path.insert(0, Block())
from ait_jax import bench, cli
cli.run(bench.define_flags, bench.main, ['ait_jax.bench', *sys.argv[1:]])
'''


def test_gpu_suite_smoke_runs_without_the_data_stack(tmp_path):
  """`--suite=gpu --smoke`, the GPU measurement's code with tiny sizes on the CPU, in a process
  where importing grain or tensorflow_datasets fails, as on the GPU host."""
  out = tmp_path / 'suite'
  proc = subprocess.run([sys.executable, '-c', _BLOCK_DATA_STACK, '--suite=gpu', '--smoke',
                         f'--out={out}'], cwd=tmp_path, capture_output=True, text=True,
                        timeout=limit(), env={**os.environ, 'PYTHONPATH': str(ROOT)})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((out / 'gpu_suite.json').read_text())
  assert result['smoke'] and result['hardware']['platform'] == 'cpu'
  selections, train_steps = result['correctness']['selections'], result['correctness'][
      'train_steps_vs_cpu']
  assert selections['passed'] and len(selections['checks']) == 10, selections
  assert train_steps['passed'] and len(train_steps['loss_device']) == 20, train_steps
  cells = result['cells']
  assert [(c['arch'], c['selection']) for c in cells] == [
      ('vit', None), ('ait', 'full'), ('ait', 'threshold')]
  assert all(c['images_per_s'] > 0 and c['xla_bytes_per_device'] > 0 for c in cells), cells
  # The profiles: traces TensorBoard reads, the train step named, its ops by time.
  for arch in ('ait', 'vit'):
    profile = result['profiles'][arch]
    (session,) = (out / 'profile' / f'{arch}_small_bfloat16' / 'plugins' / 'profile').iterdir()
    assert profile['run_dir'] == str(session) and list(session.glob('*.xplane.pb'))
    assert profile['modules'] == ['jit_train_steps'] and profile['steps'] == 3
    ops = profile['top_ops']
    assert len(ops) == 15 and ops == sorted(ops, key=lambda r: -r['ms_per_step'])
    assert sum(profile['by_kind_ms'].values()) == pytest.approx(profile['ops_ms_per_step'])
    events = json.loads(gzip.decompress(next(session.glob('*.trace.json.gz')).read_bytes()))
    assert [e['args']['step_num'] for e in events['traceEvents'] if e.get('name') == 'train'] == [
        '0', '1', '2']
  ait, vit = result['profiles']['ait'], result['profiles']['vit']
  assert ait['by_kind_ms']['sort / top-k'] > 0 and 'sort / top-k' not in vit['by_kind_ms']
  assert ait['by_scope_ms']['workspace'] > 0 and 'workspace' not in vit['by_scope_ms']
  assert len(result['targets']) == 4
  # The table comes last: the anchors close it.
  tail = proc.stdout.strip().splitlines()
  assert tail[-1].startswith('  JAX dense ViT (AiT-Small dims), bf16: 9.58 ms'), tail[-5:]
  assert any(line.startswith('Targets') for line in tail)
