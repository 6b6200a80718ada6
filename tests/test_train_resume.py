"""Exact resume and preemption, with real `python -m train` processes.

- 20 steps straight vs. a run killed with SIGKILL after its step-10 checkpoint
  and resumed to 20, with 2-microbatch gradient accumulation and a grain
  worker process reading the data: the per-step losses and the final
  parameters are bitwise equal.
- SIGTERM (SIGINT) at a random step: a checkpoint at exactly that step, exit
  code 0 (130).

The runs share a persistent compilation cache (same programs: the constant
schedule does not depend on `train.steps`), so only the first one compiles.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ['--config', 'configs/llama.py:tiny', '--config.model.num_layers=1',
         '--config.train.seq_len=32', '--config.train.lr_schedule=constant',
         '--config.train.warmup_steps=5', '--config.train.log_every_steps=1',
         '--config.train.eval_steps=0']
TIMEOUT = 600


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  e = dict(os.environ)
  e.update(JAX_PLATFORMS='cpu', ABLAX_NO_BAR='1',
           XLA_FLAGS='--xla_force_host_platform_device_count=8',
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return e


def command(workdir, *extra):
  return [sys.executable, '-m', 'train', *FLAGS, '--workdir', str(workdir), *extra]


def train_losses(workdir):
  # The accumulator drops events orphaned by a restart (steps logged after
  # the checkpoint a resumed run went back to), as TensorBoard shows them.
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'scalars': 0})
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars('train/loss')}


def final_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))


def finished_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def test_killed_and_resumed_run_is_bitwise_the_straight_run(tmp_path, env):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  every = ['--config.train.checkpoint_every_steps=5', '--config.train.grad_accum_steps=2',
           '--config.train.global_batch_size=16', '--config.data.worker_count=1']
  subprocess.run(command(straight, '--config.train.steps=20', *every), env=env,
                 cwd=REPO, check=True, timeout=TIMEOUT, capture_output=True)

  # Same run, but far from done when its step-10 checkpoint lands: kill it.
  log = open(tmp_path / 'killed.log', 'wb')
  proc = subprocess.Popen(command(killed, '--config.train.steps=100000', *every),
                          env=env, cwd=REPO, stdout=log, stderr=log)
  deadline = time.monotonic() + TIMEOUT
  while 10 not in finished_steps(killed):
    assert proc.poll() is None, (tmp_path / 'killed.log').read_text()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  log.close()

  resumed = subprocess.run(command(killed, '--config.train.steps=20', *every),
                           env=env, cwd=REPO, timeout=TIMEOUT, capture_output=True)
  assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
  assert re.search(r'resumed from .*checkpoints/(10|15|20)\b', resumed.stderr.decode())

  want, got = train_losses(straight), train_losses(killed)
  assert sorted(want) == list(range(1, 21))
  assert got == want                               # float32, bitwise
  a, b = final_state(straight, 20), final_state(killed, 20)
  assert int(a['step']) == int(b['step']) == 20
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))
  # The data iterators are at the same position.
  read = lambda w: json.loads(open(os.path.join(
      w, 'checkpoints', '20', 'data', 'process_0-of-1.json')).read())
  assert read(straight) == read(killed)


@pytest.mark.parametrize('sig,status', [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_at_that_step_and_exits(tmp_path, env, sig, status):
  """SIGTERM (a preemption) exits 0; SIGINT (Ctrl-C) exits 130; both save."""
  target = random.Random().randint(3, 12)
  proc = subprocess.Popen(
      command(tmp_path, '--config.train.steps=100000',
              '--config.train.checkpoint_every_steps=100000'),
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()
  deadline = time.monotonic() + TIMEOUT
  while not any(line.startswith(f'step {target:>6d}/') for line in list(lines)):
    assert proc.poll() is None, ''.join(lines)[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.02)
  proc.send_signal(sig)
  assert proc.wait(timeout=TIMEOUT) == status, ''.join(lines)[-3000:]
  reader.join(timeout=10)
  said = re.search(sig.name + r': saved checkpoint (\d+)', ''.join(lines))
  assert said, ''.join(lines)[-3000:]
  step = int(said.group(1))
  assert step >= target, (step, target)
  # The one checkpoint is the step SIGTERM arrived at, and holds that state.
  assert finished_steps(tmp_path) == [step]
  assert int(final_state(tmp_path, step)['step']) == step
  assert max(train_losses(tmp_path)) == step
  assert not os.path.exists(os.path.join(tmp_path, 'LOCK'))   # released
