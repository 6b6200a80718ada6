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

from absl import flags

import configs
from configs import cli
from configs import errors

TEMPLATES = {
    'slurm': 'slurm.sbatch',
    'tpu': 'tpu_pod.sh',
    'xpk': 'xpk.sh',
}
_TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'templates')


class ClusterError(configs.UserError):
  """A setting the chosen cluster kind needs is missing or wrong."""


def template_text(kind: str) -> str:
  if kind not in TEMPLATES:
    raise ClusterError(f'unknown cluster kind {kind!r}: one of {", ".join(TEMPLATES)}')
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
    raise ClusterError(f'unknown cluster kind {kind!r}: one of {", ".join(TEMPLATES)}')
  return string.Template(template_text(kind)).substitute(values)


def _required(settings: dict, key: str):
  if not settings.get(key):
    raise ClusterError(f'--{key} is required for this cluster kind')
  return settings[key]


def _workload_name(name: str) -> str:
  """XPK/Kubernetes names: lower-case letters, digits and '-', at most 40 chars."""
  cleaned = ''.join(c if c.isalnum() else '-' for c in name.lower()).strip('-')
  return (cleaned or 'ablax')[:40].rstrip('-')


FLAGS = flags.FlagValues()
flags.DEFINE_string('config', None, 'the run\'s config: configs/NAME.py[:ARG]',
                    flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'the run\'s workdir as the hosts see it (a shared '
                    'file system or gs://)', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'the script to write (default: print it)',
                    flag_values=FLAGS)
flags.DEFINE_string('python', 'python3', 'the interpreter on the hosts', flag_values=FLAGS)
flags.DEFINE_enum('module', 'train', ['train', 'align'], 'the stage the hosts run',
                  flag_values=FLAGS)
flags.DEFINE_string('repo', '$HOME/ablax', 'the ablax checkout on the hosts',
                    flag_values=FLAGS)
flags.DEFINE_string('name', None, 'job / workload name (default: the workdir\'s name)',
                    flag_values=FLAGS)
# SLURM.
flags.DEFINE_integer('nodes', 1, 'slurm: nodes', flag_values=FLAGS)
flags.DEFINE_integer('gpus_per_node', 8, 'slurm: GPUs per node', flag_values=FLAGS)
flags.DEFINE_integer('tasks_per_node', 1, 'slurm: 1 runs a process per node (it sees all '
                     'the node\'s GPUs); the GPUs per node run a process per GPU',
                     flag_values=FLAGS)
flags.DEFINE_integer('cpus_per_task', 16, 'slurm: CPUs per task', flag_values=FLAGS)
flags.DEFINE_string('time_limit', '24:00:00', 'slurm: the job\'s time limit',
                    flag_values=FLAGS)
flags.DEFINE_string('log_dir', '.', 'slurm: where the job\'s output files go',
                    flag_values=FLAGS)
flags.DEFINE_multi_string('sbatch', [], 'slurm: an extra #SBATCH option, e.g. '
                          '--sbatch=--partition=gpu', flag_values=FLAGS)
# TPU VM and XPK.
flags.DEFINE_string('tpu_name', None, 'tpu: the TPU VM', flag_values=FLAGS)
flags.DEFINE_string('zone', None, 'tpu, xpk: the zone', flag_values=FLAGS)
flags.DEFINE_string('project', None, 'tpu, xpk: the Google Cloud project', flag_values=FLAGS)
flags.DEFINE_string('cluster', None, 'xpk: the GKE cluster', flag_values=FLAGS)
flags.DEFINE_string('tpu_type', None, 'xpk: the slice type, e.g. v5p-64', flag_values=FLAGS)
flags.DEFINE_integer('num_slices', 1, 'xpk: slices', flag_values=FLAGS)
flags.DEFINE_string('docker_image', None, 'xpk: the image holding ablax', flag_values=FLAGS)
flags.DEFINE_string('workload', None, 'xpk: the workload name (default: --name)',
                    flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m launch.cluster KIND [flags]` (argv without the program name)."""
  args = cli.parse(FLAGS, argv, doc=__doc__, prog='python -m launch.cluster',
                   positional={'KIND': f'the cluster: {" | ".join(TEMPLATES)}'},
                   required=('config', 'workdir'), overrides=True)
  if args.KIND not in TEMPLATES:
    raise ClusterError(f'unknown cluster kind {args.KIND!r}: one of {", ".join(TEMPLATES)}')
  settings = {name: getattr(args, name) for name in (
      'name', 'nodes', 'gpus_per_node', 'tasks_per_node', 'cpus_per_task', 'time_limit',
      'log_dir', 'sbatch', 'tpu_name', 'zone', 'project', 'cluster', 'tpu_type',
      'num_slices', 'docker_image', 'workload')}
  script_name = os.path.basename(args.out) if args.out else TEMPLATES[args.KIND]
  text = render(args.KIND, config=args.config, workdir=args.workdir,
                overrides=args.overrides, python=args.python, module=args.module,
                repo=args.repo, script_name=script_name, **settings)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
    os.chmod(args.out, 0o755)
    print(f'wrote {args.out}')
  else:
    sys.stdout.write(text)
  return 0


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
