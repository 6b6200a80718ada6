"""Exact resume and preemption, with real `python -m train` processes.

- 20 steps straight vs. a run killed with SIGKILL after its step-10 checkpoint
  and resumed to 20, with 2-microbatch gradient accumulation and a grain
  worker process reading the data: the per-step losses and the final
  parameters are bitwise equal.
- The same run killed while its step-10 checkpoint is being written (the
  process SIGKILLs itself from inside orbax's save, after the data item was
  written into the step's temporary folder): checkpoint 5 stays the newest,
  the resumed run starts from it and again ends bitwise equal.
- A 2-process job (`jax.distributed`, gloo, 4 fake devices each) killed
  after its step-2 checkpoint and resumed: bitwise the straight 2-process job.
- SIGTERM (SIGINT) at a random step: a checkpoint at exactly that step, exit
  code 0 (130).

The runs share a persistent compilation cache (same programs: the constant
schedule does not depend on `train.steps`), so only the first one compiles.
The driver is tests/kill_resume.py (shared with the DPO and mixture tests).
"""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from launch import local
from tests import kill_resume

FLAGS = ['--config', 'configs/llama.py:tiny', '--config.model.num_layers=1',
         '--config.train.seq_len=32', '--config.train.lr_schedule=constant',
         '--config.train.warmup_steps=5', '--config.train.log_every_steps=1',
         '--config.train.eval_steps=0']
EVERY = ['--config.train.checkpoint_every_steps=5', '--config.train.grad_accum_steps=2',
         '--config.train.global_batch_size=16', '--config.data.worker_count=1']
TIMEOUT = kill_resume.TIMEOUT

# `python -m train` that SIGKILLs itself inside the N-th data-item save of
# orbax (ABLAX_TEST_KILL_AT_SAVE), once that item's file is in the step's
# temporary folder, and writes that folder's path to ABLAX_TEST_KILLED_IN.
KILLED_MID_SAVE = '''
import os, runpy, signal, sys
import grain
real, calls = grain.checkpoint.CheckpointHandler.save, []
def save(self, directory, *args, **kwargs):
  real(self, directory, *args, **kwargs)
  calls.append(1)
  if len(calls) == int(os.environ['ABLAX_TEST_KILL_AT_SAVE']):
    with open(os.environ['ABLAX_TEST_KILLED_IN'], 'w') as f:
      f.write(str(directory))
    os.kill(os.getpid(), signal.SIGKILL)
grain.checkpoint.CheckpointHandler.save = save
sys.argv = ['train'] + sys.argv[1:]
runpy.run_module('train', run_name='__main__', alter_sys=True)
'''


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return kill_resume.environment(tmp_path_factory.mktemp('jax_cache'))


def command(workdir, steps, *extra):
  return kill_resume.command('train', FLAGS, workdir, steps, *extra)


@pytest.fixture(scope='module')
def straight(env, tmp_path_factory):
  """The uninterrupted 20-step run the killed ones must reproduce."""
  workdir = tmp_path_factory.mktemp('straight')
  kill_resume.run(command(workdir, 20, *EVERY), env)
  return workdir


def assert_same_run(want, got, step):
  losses = kill_resume.scalars(want, 'train/loss')
  assert sorted(losses) == list(range(1, step + 1))
  assert kill_resume.scalars(got, 'train/loss') == losses     # float32, bitwise
  a, b = kill_resume.saved_state(want, step), kill_resume.saved_state(got, step)
  assert int(a['step']) == int(b['step']) == step
  kill_resume.assert_same_state(a, b)
  # The data iterators are at the same position.
  assert kill_resume.data_positions(want, step) == kill_resume.data_positions(got, step)


def test_killed_and_resumed_run_is_bitwise_the_straight_run(tmp_path, env, straight):
  killed = tmp_path / 'killed'
  resumed = kill_resume.kill_and_resume(
      lambda w, steps: command(w, steps, *EVERY), killed, kill_after=10, steps=20,
      env=env, log_path=tmp_path / 'killed.log')
  assert re.search(r'resumed from .*checkpoints/(10|15|20)\b', resumed)
  assert_same_run(straight, killed, 20)


def test_run_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path, env, straight):
  killed = tmp_path / 'killed'
  where = tmp_path / 'killed_in'
  crash = dict(env, ABLAX_TEST_KILL_AT_SAVE='2', ABLAX_TEST_KILLED_IN=str(where))
  kill_resume.run_until_killed([sys.executable, '-c', KILLED_MID_SAVE, *FLAGS, '--workdir',
                                str(killed), '--config.train.steps=20', *EVERY],
                               crash, tmp_path / 'killed.log')
  # Killed while writing checkpoint 10: its folder is still a temporary one.
  checkpoints = killed / 'checkpoints'
  temporary = [n for n in os.listdir(checkpoints) if not n.isdigit()]
  assert kill_resume.saved_steps(killed) == [5], os.listdir(checkpoints)
  assert len(temporary) == 1 and temporary[0].startswith('10.'), temporary
  assert str(checkpoints / temporary[0]) in where.read_text()

  resumed = kill_resume.run(command(killed, 20, *EVERY), env)
  assert re.search(r'resumed from .*checkpoints/5\b', resumed), resumed[-3000:]
  assert all(n.isdigit() for n in os.listdir(checkpoints))     # cleaned up
  assert_same_run(straight, killed, 20)


TWO_PROCESSES = ['--config.train.seq_len=16', '--config.model.d_model=32',
                 '--config.model.d_ff=64', '--config.mesh.fsdp=2', '--config.mesh.data=-1',
                 '--config.train.checkpoint_every_steps=2', '--config.train.warmup_steps=1']


def test_two_process_run_killed_and_resumed_is_bitwise_the_straight_job(tmp_path):
  env = local.process_env(4, kill_resume.environment(tmp_path / 'jax_cache'))
  job = lambda w, steps: local.commands(2, [*FLAGS, *TWO_PROCESSES, '--workdir', str(w),
                                            f'--config.train.steps={steps}'])
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  kill_resume.run(job(straight, 4), env)
  resumed = kill_resume.kill_and_resume(job, killed, kill_after=2, steps=4, env=env,
                                        log_path=tmp_path / 'killed.log')
  assert re.search(r'resumed from .*checkpoints/(2|4)\b', resumed)
  assert_same_run(straight, killed, 4)
  assert sorted(kill_resume.data_positions(killed, 4)) == [
      'process_0-of-2.json', 'process_1-of-2.json']


@pytest.mark.parametrize('sig,status', [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_at_that_step_and_exits(tmp_path, env, sig, status):
  """SIGTERM (a preemption) exits 0; SIGINT (Ctrl-C) exits 130; both save."""
  target = random.Random().randint(3, 12)
  proc = subprocess.Popen(
      command(tmp_path, kill_resume.FOREVER, '--config.train.checkpoint_every_steps=100000'),
      env=env, cwd=kill_resume.REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
      text=True)
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
  assert kill_resume.saved_steps(tmp_path) == [step]
  assert int(kill_resume.saved_state(tmp_path, step)['step']) == step
  assert max(kill_resume.scalars(tmp_path, 'train/loss')) == step
  assert not os.path.exists(os.path.join(tmp_path, 'LOCK'))   # released
