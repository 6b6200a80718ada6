"""The resume tests' driver: real `python -m train|align` processes, one of
them killed with SIGKILL once a checkpoint has landed, then resumed; and
readers of what the runs left (TensorBoard scalars, checkpointed states,
data positions) to compare them bitwise.

Used by tests/test_train_resume.py, tests/test_align_loop.py and
tests/test_data_mixture.py.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from tensorboard.backend.event_processing import event_accumulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
FOREVER = 100000            # train.steps of a run that is killed before its end


def environment(cache_dir, devices: int = 8) -> dict:
  """A subprocess environment: CPU, `devices` fake devices, no progress bar,
  and a persistent compilation cache in `cache_dir` (runs of the same
  programs compile once)."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', ABLAX_NO_BAR='1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def command(module: str, flags, workdir, steps: int, *extra) -> list[str]:
  return [sys.executable, '-m', module, *flags, '--workdir', str(workdir),
          f'--config.train.steps={steps}', *extra]


def _commands(cmd) -> list[list[str]]:
  """One command, or the commands of a multi-process job."""
  return cmd if isinstance(cmd[0], list) else [cmd]


def run(cmd, env, timeout: int = TIMEOUT) -> str:
  """Runs `cmd` (or every command of a job, at once) to its end, asserting
  exit 0; returns the (first) command's stderr."""
  logs = [tempfile.TemporaryFile() for _ in _commands(cmd)]
  procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
           for c, log in zip(_commands(cmd), logs)]
  deadline = time.monotonic() + timeout
  errors = []
  try:
    for p, log in zip(procs, logs):
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
      log.seek(0)
      errors.append(log.read().decode())
      assert p.returncode == 0, errors[-1][-3000:]
  finally:
    for p, log in zip(procs, logs):
      if p.poll() is None:        # a failed job: the others would wait forever
        p.kill()
        p.wait()
      log.close()
  return errors[0]


def saved_steps(workdir) -> list[int]:
  """Finished checkpoints (orbax renames a step's folder to STEP once written)."""
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def kill_when(cmd, env, until, log_path, timeout: int = TIMEOUT) -> None:
  """Starts `cmd` (or every command of a job), waits until `until()` is
  true, and SIGKILLs every process."""
  paths = [str(log_path) + ('' if i == 0 else f'.{i}') for i in range(len(_commands(cmd)))]
  logs = [open(path, 'wb') for path in paths]
  procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=log, stderr=log,
                            start_new_session=True) for c, log in zip(_commands(cmd), logs)]
  try:
    deadline = time.monotonic() + timeout
    while not until():
      for p, path in zip(procs, paths):
        assert p.poll() is None, f'exit {p.returncode}: ' + open(path).read()[-5000:]
      assert time.monotonic() < deadline, 'timed out'
      time.sleep(0.05)
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
    for log in logs:
      log.close()
  for p in procs:
    assert p.wait(timeout=60) == -signal.SIGKILL
    kill_group(p)


def kill_group(proc) -> None:
  """SIGKILLs what a killed process left in its session (grain workers)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run_until_killed(cmd, env, log_path, timeout: int = TIMEOUT) -> None:
  """Runs `cmd`, which must end by SIGKILL (it kills itself)."""
  with open(log_path, 'wb') as log:
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=log,
                            start_new_session=True)
    try:
      status = proc.wait(timeout=timeout)
    finally:
      proc.kill()
      kill_group(proc)
  assert status == -signal.SIGKILL, open(log_path).read()[-3000:]


def kill_and_resume(make_command, workdir, *, kill_after: int, steps: int, env,
                    log_path) -> str:
  """`make_command(workdir, steps)` (a command or a job's commands) run far
  past `steps`, killed with SIGKILL
  once its checkpoint `kill_after` is written, then resumed to `steps`.
  Returns the resumed run's stderr (it names the checkpoint it resumed from)."""
  kill_when(make_command(workdir, FOREVER), env,
            lambda: kill_after in saved_steps(workdir), log_path)
  return run(make_command(workdir, steps), env)


def scalars(workdir, tag: str) -> dict[int, float]:
  """{step: value} of a TensorBoard tag; like TensorBoard, the accumulator
  drops events orphaned by a restart (steps logged after the checkpoint a
  resumed run went back to)."""
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'scalars': 0})
  acc.Reload()
  return {e.step: e.value for e in acc.Scalars(tag)}


def saved_state(workdir, step: int):
  """The train state of checkpoint `step`, read with orbax alone onto one
  device (whatever devices and processes wrote it)."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        getattr(metadata, 'item_metadata', metadata))
  return checkpointer.restore(path, target)


def assert_same_state(a, b) -> None:
  """Every leaf of two train states bitwise equal (same tree)."""
  paths = jax.tree_util.tree_flatten_with_path(a)[0]
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(paths, jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


def data_positions(workdir, step: int) -> dict[str, dict]:
  """Every process's checkpointed data-iterator state at `step`."""
  directory = os.path.join(workdir, 'checkpoints', str(step), 'data')
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith('.json'):
      with open(os.path.join(directory, name)) as f:
        out[name] = json.load(f)
  return out
