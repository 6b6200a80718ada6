"""`python -m launch.cluster`: render a cluster launch script for one run.

    python -m launch.cluster slurm --config configs/llama.py:small \\
        --workdir /shared/ablax/llama_small --nodes 2 --gpus_per_node 8 \\
        --out llama_small.sbatch --config.train.steps=5000
    python -m launch.cluster tpu --tpu_name my-v5e-32 --zone us-west4-a \\
        --project my-proj --config configs/llama.py:small \\
        --workdir gs://bucket/ablax/llama_small --out run_tpu.sh
    python -m launch.cluster xpk --cluster my-gke --tpu_type v5p-64 \\
        --docker_image gcr.io/my-proj/ablax --config configs/llama.py:small \\
        --workdir gs://bucket/ablax/llama_small --out run_xpk.sh

The templates are text files under `launch/templates/` (`slurm.sbatch`,
`tpu_pod.sh`, `xpk.sh`) with `$name` fields; this fills them with the run's
`python -m train` command (config, workdir, `--config.PATH=VALUE` overrides,
each checked by `configs.load` first) and the cluster's settings. The result
is a script you submit (`sbatch FILE`) or run (`bash FILE`); nothing here
talks to a cluster. Every host runs the same command: `train.distributed`
detects the multi-process job (SLURM variables, TPU metadata) and calls
`jax.distributed.initialize()`.
"""

import os
import shlex
import string
import sys

import configs

TEMPLATES = {
    'slurm': 'slurm.sbatch',
    'tpu': 'tpu_pod.sh',
    'xpk': 'xpk.sh',
}
_TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'templates')


def template_text(kind: str) -> str:
  if kind not in TEMPLATES:
    raise ValueError(f'unknown cluster kind {kind!r}: one of {", ".join(TEMPLATES)}')
  with open(os.path.join(_TEMPLATE_DIR, TEMPLATES[kind])) as f:
    return f.read()


def train_command(config: str, workdir: str, overrides=(), *, python='python3',
                  module='train') -> str:
  """The shell-quoted `python -m train ...` line every host runs."""
  argv = [python, '-m', module, '--config', config, '--workdir', workdir]
  argv += [f'--config.{o}' for o in overrides]
  return shlex.join(argv)


def render(kind: str, *, config: str, workdir: str, overrides=(), python='python3',
           module='train', repo='$HOME/ablax', script_name='run.sh', **settings) -> str:
  """The launch script of `kind` for one run (validates the config first)."""
  configs.load(config, list(overrides))
  command = train_command(config, workdir, overrides, python=python, module=module)
  name = settings.pop('name', None) or os.path.basename(os.path.normpath(workdir)) or 'ablax'
  values = {'command': command, 'script_name': script_name, 'repo': repo}
  if kind == 'slurm':
    per_gpu = int(settings.get('tasks_per_node', 1)) > 1
    values.update(
        job_name=name,
        nodes=settings.get('nodes', 1),
        tasks_per_node=settings.get('tasks_per_node', 1),
        gpus_per_node=settings.get('gpus_per_node', 8),
        cpus_per_task=settings.get('cpus_per_task', 16),
        time_limit=settings.get('time_limit', '24:00:00'),
        log_dir=settings.get('log_dir', '.'),
        extra_sbatch='\n'.join(f'#SBATCH {line}' for line in settings.get('sbatch', ())),
        gpu_binding=('one task per GPU: each task sees its own GPU' if per_gpu else
                     'one task per node: the task sees all of the node\'s GPUs'),
        srun_flags='--gpus-per-task=1' if per_gpu else '')
  elif kind == 'tpu':
    remote = f'cd {repo} && {command}'
    values.update(tpu_name=_required(settings, 'tpu_name'),
                  zone=_required(settings, 'zone'),
                  project=_required(settings, 'project'),
                  remote_command=shlex.quote(remote))
  elif kind == 'xpk':
    values.update(cluster=_required(settings, 'cluster'),
                  project=settings.get('project') or '$(gcloud config get project)',
                  zone=settings.get('zone') or '$(gcloud config get compute/zone)',
                  workload=_workload_name(settings.get('workload') or name),
                  tpu_type=_required(settings, 'tpu_type'),
                  num_slices=settings.get('num_slices', 1),
                  docker_image=_required(settings, 'docker_image'),
                  quoted_command=shlex.quote(command))
  else:
    raise ValueError(f'unknown cluster kind {kind!r}: one of {", ".join(TEMPLATES)}')
  return string.Template(template_text(kind)).substitute(values)


def _required(settings: dict, key: str):
  if not settings.get(key):
    raise ValueError(f'--{key} is required for this cluster kind')
  return settings[key]


def _workload_name(name: str) -> str:
  """XPK/Kubernetes names: lower-case letters, digits and '-', at most 40 chars."""
  cleaned = ''.join(c if c.isalnum() else '-' for c in name.lower()).strip('-')
  return (cleaned or 'ablax')[:40].rstrip('-')


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m launch.cluster',
                                   description='Render a cluster launch script for one run.',
                                   epilog='Overrides: --config.PATH=VALUE (any number).')
  parser.add_argument('kind', choices=sorted(TEMPLATES))
  parser.add_argument('--config', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default=None, help='file to write (default: print)')
  parser.add_argument('--python', default='python3', help='interpreter on the hosts')
  parser.add_argument('--module', default='train', help='train or align')
  parser.add_argument('--repo', default='$HOME/ablax', help='the checkout on the hosts')
  parser.add_argument('--name', default=None, help='job / workload name')
  # SLURM.
  parser.add_argument('--nodes', type=int, default=1)
  parser.add_argument('--gpus_per_node', type=int, default=8)
  parser.add_argument('--tasks_per_node', type=int, default=1,
                      help='1: a process per node; GPUs per node: a process per GPU')
  parser.add_argument('--cpus_per_task', type=int, default=16)
  parser.add_argument('--time_limit', default='24:00:00')
  parser.add_argument('--log_dir', default='.')
  parser.add_argument('--sbatch', action='append', default=[],
                      help='extra #SBATCH option, e.g. --sbatch=--partition=gpu')
  # TPU VM and XPK.
  parser.add_argument('--tpu_name', default=None)
  parser.add_argument('--zone', default=None)
  parser.add_argument('--project', default=None)
  parser.add_argument('--cluster', default=None)
  parser.add_argument('--tpu_type', default=None)
  parser.add_argument('--num_slices', type=int, default=1)
  parser.add_argument('--docker_image', default=None)
  parser.add_argument('--workload', default=None)
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for arg in rest:
    if not arg.startswith('--config.') or '=' not in arg:
      parser.error(f'unrecognised argument {arg!r}')
    overrides.append(arg[len('--config.'):])
  settings = {k: v for k, v in vars(args).items()
              if k not in ('kind', 'config', 'workdir', 'out', 'python', 'module', 'repo')}
  script_name = os.path.basename(args.out) if args.out else TEMPLATES[args.kind]
  try:
    text = render(args.kind, config=args.config, workdir=args.workdir, overrides=overrides,
                  python=args.python, module=args.module, repo=args.repo,
                  script_name=script_name, **settings)
  except (ValueError, configs.ConfigError) as e:
    print(f'ablax-cluster: {e}', file=sys.stderr)
    return 2
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
    os.chmod(args.out, 0o755)
    print(f'wrote {args.out}')
  else:
    sys.stdout.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
