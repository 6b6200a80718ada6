"""launch.cluster: the rendered SLURM, TPU VM pod and XPK scripts hold the run.

The command inside each script is parsed back with shlex (as the shell on the
hosts would) and must be exactly the run's `python -m train` line; the
cluster settings must appear as the flags the tools take.
"""

import shlex

import pytest

import configs
from launch import cluster

CONFIG = 'configs/llama.py:small'
OVERRIDES = ['train.steps=5000', 'model.norm_type=layernorm', 'mesh.fsdp=-1', 'mesh.data=1']
WORKDIR = '/shared/ablax/norm_type=layernorm,position=alibi'
EXPECTED = ['python3', '-m', 'train', '--config', CONFIG, '--workdir', WORKDIR,
            '--config.train.steps=5000', '--config.model.norm_type=layernorm',
            '--config.mesh.fsdp=-1', '--config.mesh.data=1']


def _line_after(text, prefix):
  lines = [l.strip() for l in text.splitlines() if l.strip().startswith(prefix)]
  assert len(lines) == 1, (prefix, text)
  return lines[0]


def test_slurm_script():
  text = cluster.render('slurm', config=CONFIG, workdir=WORKDIR, overrides=OVERRIDES,
                        nodes=4, gpus_per_node=8, tasks_per_node=8,
                        sbatch=['--partition=h100'], repo='/home/me/ablax')
  for line in ('#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=8', '#SBATCH --gpus-per-node=8',
               '#SBATCH --partition=h100', 'cd /home/me/ablax'):
    assert line in text.splitlines()
  assert '$' not in text.replace('$SLURM', '')     # every field filled
  srun = text[text.index('srun'):].replace('\\\n', ' ')
  argv = shlex.split(srun)
  assert argv[:3] == ['srun', '--kill-on-bad-exit=1', '--gpus-per-task=1']
  assert argv[3:] == EXPECTED
  # One process per node: no per-task GPU binding.
  one = cluster.render('slurm', config=CONFIG, workdir=WORKDIR, overrides=OVERRIDES)
  assert shlex.split(one[one.index('srun'):].replace('\\\n', ' '))[2:] == EXPECTED
  assert text.startswith('#!/bin/bash')
  # #SBATCH lines must come before the first command or sbatch ignores them.
  body = [l for l in text.splitlines() if l and not l.startswith('#')]
  assert text.index(body[0]) > text.rindex('#SBATCH')


def test_tpu_pod_script():
  text = cluster.render('tpu', config=CONFIG, workdir=WORKDIR, overrides=OVERRIDES,
                        tpu_name='my-v5e-32', zone='us-west4-a', project='proj',
                        repo='~/ablax')
  command = shlex.split(text[text.index('gcloud'):].replace('\\\n', ' '))
  assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-v5e-32']
  assert {'--zone=us-west4-a', '--project=proj', '--worker=all'} <= set(command)
  remote = [a for a in command if a.startswith('--command=')]
  assert len(remote) == 1
  cd, train = remote[0][len('--command='):].split(' && ')
  assert cd == 'cd ~/ablax'
  assert shlex.split(train) == EXPECTED


def test_xpk_command():
  text = cluster.render('xpk', config=CONFIG, workdir=WORKDIR, overrides=OVERRIDES,
                        cluster='my-gke', tpu_type='v5p-64', num_slices=2,
                        docker_image='gcr.io/p/ablax', project='p', zone='z')
  command = shlex.split(text[text.index('xpk workload'):].replace('\\\n', ' '))
  assert command[:3] == ['xpk', 'workload', 'create']
  assert {'--cluster=my-gke', '--tpu-type=v5p-64', '--num-slices=2',
          '--docker-image=gcr.io/p/ablax', '--project=p', '--zone=z'} <= set(command)
  workload = [a for a in command if a.startswith('--workload=')][0].split('=', 1)[1]
  assert workload == 'norm-type-layernorm-position-alibi'
  inner = [a for a in command if a.startswith('--command=')][0][len('--command='):]
  assert shlex.split(inner) == EXPECTED


def test_bad_override_or_missing_setting_is_refused():
  with pytest.raises(configs.ConfigError, match='model.norm_typ'):
    cluster.render('slurm', config=CONFIG, workdir=WORKDIR, overrides=['model.norm_typ=x'])
  with pytest.raises(ValueError, match='--tpu_name'):
    cluster.render('tpu', config=CONFIG, workdir=WORKDIR, zone='z', project='p')


def test_cli_writes_the_file(tmp_path):
  out = tmp_path / 'job.sbatch'
  assert cluster.main(['slurm', '--config', CONFIG, '--workdir', WORKDIR, '--nodes', '2',
                       '--out', str(out), *[f'--config.{o}' for o in OVERRIDES]]) == 0
  text = out.read_text()
  assert '#SBATCH --nodes=2' in text and 'sbatch job.sbatch' in text
  assert shlex.split(text[text.index('srun'):].replace('\\\n', ' '))[2:] == EXPECTED
