"""`python -m launch.local`: a multi-process (multi-host) job on one machine.

    python -m launch.local --num_processes 2 --devices_per_process 4 -- \\
        --config configs/llama.py:tiny --workdir /tmp/ablax_mp

starts N processes of `python -m train ARGS` (or `--module align`), each with
`--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I` (a
free port), `--xla_force_host_platform_device_count=D` fake CPU devices, and
gloo CPU collectives (set by `train.distributed`), so the job sees N x D
devices across N processes, as on N hosts of a pod. It is the way to try a
multi-host run, its sharded checkpoints and its resumption on a laptop.

Process 0's output is shown as is; the others' lines are prefixed `[I]`. If a
process fails the others are stopped; the exit status is the first non-zero
one.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading

from absl import flags

from configs import cli
from configs import errors


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, base=None) -> dict:
  env = dict(os.environ if base is None else base)
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 env.get('XLA_FLAGS', '')).strip()
  env['XLA_FLAGS'] = (f'{flags} --xla_force_host_platform_device_count='
                      f'{devices_per_process}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  # Clear what train.distributed would otherwise read instead of the flags.
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  return env


def commands(num_processes: int, args: list[str], *, module='train', port=None):
  """The N command lines of the job."""
  port = port or free_port()
  return [[sys.executable, '-m', module, *args,
           f'--coordinator_address=127.0.0.1:{port}',
           f'--num_processes={num_processes}', f'--process_id={i}']
          for i in range(num_processes)]


def _pump(stream, prefix, sink):
  for line in iter(stream.readline, ''):
    sink.write(prefix + line)
    sink.flush()
  stream.close()


def launch(num_processes: int, devices_per_process: int, args: list[str], *,
           module='train', timeout=None, out=None) -> int:
  """Runs the job; returns 0 if every process exited 0, else the first failure."""
  out = out or sys.stdout
  env = process_env(devices_per_process)
  procs, pumps = [], []
  for i, command in enumerate(commands(num_processes, args, module=module)):
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    pump = threading.Thread(target=_pump, args=(proc.stdout, '' if i == 0 else f'[{i}] ', out),
                            daemon=True)
    pump.start()
    procs.append(proc)
    pumps.append(pump)
  status = 0
  try:
    pending = list(procs)
    while pending:
      for proc in list(pending):
        try:
          code = proc.wait(timeout=0.5 if timeout is None else min(0.5, timeout))
        except subprocess.TimeoutExpired:
          continue
        pending.remove(proc)
        if code != 0 and status == 0:
          status = code
          # One process gone means the collectives of the others will hang.
          for other in pending:
            other.send_signal(signal.SIGTERM)
  except KeyboardInterrupt:
    status = 130
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
      proc.wait()
  for pump in pumps:
    pump.join(timeout=5)
  return status


FLAGS = flags.FlagValues()
flags.DEFINE_integer('num_processes', 2, 'processes to start, as hosts of a pod',
                     flag_values=FLAGS)
flags.DEFINE_integer('devices_per_process', 4, 'fake CPU devices of each process',
                     flag_values=FLAGS)
flags.DEFINE_enum('module', 'train', ['train', 'align'], 'the stage every process runs '
                  '(python -m MODULE)', flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m launch.local FLAGS -- TRAIN_FLAGS` (argv without the program name)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  own, rest = argv, []
  if '--' in argv and not cli.wants_help(argv):
    split = argv.index('--')
    own, rest = argv[:split], argv[split + 1:]
  args = cli.parse(FLAGS, own, doc=__doc__, prog='python -m launch.local')
  if not rest:
    raise cli.UsageError('give the training arguments after --, e.g. -- --config '
                         'configs/llama.py:tiny --workdir /tmp/ablax_mp')
  if args.num_processes < 1 or args.devices_per_process < 1:
    raise cli.UsageError('--num_processes and --devices_per_process must be >= 1')
  return launch(args.num_processes, args.devices_per_process, rest, module=args.module)


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
