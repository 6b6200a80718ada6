"""Multi-host: 2 local processes x 4 fake CPU devices (jax.distributed on
127.0.0.1, gloo collectives) train the same 5 steps as one process with 8."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import configs
from train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ['model.num_layers=1', 'train.seq_len=32', 'train.steps=5',
             'train.log_every_steps=1', 'train.eval_every_steps=5', 'train.eval_steps=1',
             'train.checkpoint_every_steps=5', 'mesh.fsdp=2', 'mesh.data=-1']
TIMEOUT = 600


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def scalars(workdir, tag):
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'scalars': 0})
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars(tag)}


def test_two_processes_match_one_process(tmp_path):
  # Reference: this process, 8 fake devices, the same mesh (data=4, fsdp=2).
  cfg = configs.load('configs/llama.py:tiny', OVERRIDES)
  single = loop.train_and_evaluate(cfg, str(tmp_path / 'single'))

  workdir = tmp_path / 'multi'
  env = dict(os.environ, JAX_PLATFORMS='cpu', ABLAX_NO_BAR='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  address = f'127.0.0.1:{free_port()}'
  procs = []
  for i in range(2):
    log = open(tmp_path / f'process_{i}.log', 'wb')
    procs.append((subprocess.Popen(
        [sys.executable, '-m', 'train', '--config', 'configs/llama.py:tiny',
         *[f'--config.{o}' for o in OVERRIDES], '--workdir', str(workdir),
         f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'],
        env=env, cwd=REPO, stdout=log, stderr=log), log))
  try:
    codes = [p.wait(timeout=TIMEOUT) for p, _ in procs]
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
      log.close()
  logs = [(tmp_path / f'process_{i}.log').read_text() for i in range(2)]
  assert codes == [0, 0], '\n\n'.join(l[-3000:] for l in logs)
  assert '2 processes' in logs[0]

  # Process 0 alone wrote the events; the losses are the one-process ones
  # (the collectives add across processes in another order: float32 tolerance).
  losses = scalars(workdir, 'train/loss')
  assert sorted(losses) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([losses[s] for s in range(1, 6)],
                             [single['losses'][s] for s in range(1, 6)], rtol=1e-5)
  assert scalars(workdir, 'eval/loss')[5] == pytest.approx(single['eval']['eval/loss'],
                                                           rel=1e-5)
  assert len([f for f in os.listdir(workdir) if f.startswith('events.')]) == 1
  # Each process saved its own data-iterator position in the checkpoint.
  data_files = os.listdir(workdir / 'checkpoints' / '5' / 'data')
  assert sorted(f for f in data_files if f.endswith('.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
