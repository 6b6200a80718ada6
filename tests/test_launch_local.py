"""Multi-host through launch.local: 2 processes x 4 fake CPU devices train as
1 process x 8 devices.

The same tiny config (on a data x fsdp mesh) runs once in this process with
its 8 fake devices and once as a 2-process job started by `launch.local`
(`jax.distributed` over 127.0.0.1, gloo collectives, 4 devices each); the
global batches, and so the losses of every step, must match (float32; the
cross-process reductions may add in another order, hence the small
tolerance). Only process 0 writes event files; both processes write their part
of the checkpoint, data-iterator position included. This is the trainer's
multi-host test as well as the launcher's.
"""

import glob
import os

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

import configs
from launch import local
from train import loop

OVERRIDES = ['train.steps=3', 'train.eval_every_steps=3', 'train.checkpoint_every_steps=3',
             'train.log_every_steps=1', 'train.eval_steps=1', 'train.seq_len=16',
             'model.num_layers=1', 'model.d_model=32', 'model.d_ff=64',
             'mesh.fsdp=2', 'mesh.data=-1']
ARGS = ['--config', 'configs/llama.py:tiny', *[f'--config.{o}' for o in OVERRIDES]]


def scalars(workdir):
  files = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert len(files) == 1, files          # process 0 alone writes
  acc = event_accumulator.EventAccumulator(files[0], size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)}
          for tag in ('train/loss', 'eval/loss')}


def test_two_processes_match_one(tmp_path, capfd, monkeypatch):
  one = str(tmp_path / 'one')
  loop.train_and_evaluate(configs.load('configs/llama.py:tiny', OVERRIDES), one)
  two = str(tmp_path / 'two')
  monkeypatch.setenv('ABLAX_NO_BAR', '1')
  capfd.readouterr()
  assert local.main(['--num_processes', '2', '--devices_per_process', '4', '--',
                     *ARGS, '--workdir', two]) == 0
  assert '2 processes' in capfd.readouterr().out
  expected, got = scalars(one), scalars(two)
  assert sorted(got['train/loss']) == [1, 2, 3] and sorted(got['eval/loss']) == [0, 3]
  for tag in expected:
    steps = sorted(expected[tag])
    np.testing.assert_allclose([got[tag][s] for s in steps],
                               [expected[tag][s] for s in steps], rtol=2e-5, atol=0)
  # Both processes wrote their data-iterator state and their part of the state.
  data = os.listdir(os.path.join(two, 'checkpoints', '3', 'data'))
  assert sorted(n for n in data if '-of-' in n) == ['process_0-of-2.json',
                                                    'process_1-of-2.json']
  state = os.listdir(os.path.join(two, 'checkpoints', '3', 'state'))
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(state)


def test_commands_and_environment():
  cmds = local.commands(3, ['--config', 'c.py', '--workdir', 'w'], port=4321)
  assert [c[-3:] for c in cmds] == [
      ['--coordinator_address=127.0.0.1:4321', '--num_processes=3', f'--process_id={i}']
      for i in range(3)]
  env = local.process_env(4, {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --foo',
                              'JAX_PROCESS_ID': '7'})
  assert env['XLA_FLAGS'].split() == ['--foo', '--xla_force_host_platform_device_count=4']
  assert 'JAX_PROCESS_ID' not in env and env['JAX_PLATFORMS'] == 'cpu'
