"""The command line of every `python -m` entry, as a user meets it.

- `--help` exits 0 and names the entry's main flags and an example command;
- a flag the entry does not know exits 2 with one `ablax: ...` line;
- `--config.PATH=VALUE` overrides go through `configs.apply_override` for
  every entry: `None` is accepted for a field whose default is a typed None
  (`train.spike_threshold`, `train.loss_chunk_size`, `train.b1`), `true` for a
  boolean, a dict for `model.rope_scaling`;
- an entry's `main(argv)` can run twice in one process (its own FlagValues).

The subprocesses run a few at a time; most never import JAX.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap

import pytest
from absl import flags

import configs
from configs import cli
from configs import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# entry -> what its --help must name (its main flags and arguments).
ENTRIES = {
    'train': ['--config', '--workdir', '--config.PATH=VALUE', '--coordinator_address'],
    'align': ['--config', '--workdir', '--config.PATH=VALUE'],
    'train.evaluate': ['--workdir', '--checkpoint', '--stride', '--lengths', '--tasks'],
    'train.sample': ['--workdir', '--prompt', '--max_new_tokens', '--temperature'],
    'model.hf': ['import', 'export'],
    'launch.sweep': ['--config', '--workdir', '--sweep', '--zip', '--seeds', '--match',
                     '--tune', '--budget_flops', '--dry_run', '--config.PATH=VALUE'],
    'launch.compare': ['DIR', '--metric', '--baseline', '--scaling', '--lengths'],
    'launch.fit': ['TABLE', '--predict', '--budget'],
    'launch.scaling': ['--config', '--workdir', '--budgets', '--sizes', '--sweep'],
    'launch.local': ['--num_processes', '--devices_per_process', '--module'],
    'launch.cluster': ['KIND', '--config', '--workdir', '--nodes', '--tpu_name', '--out'],
    'data.prepare': ['--input', '--format', '--tokenizer', '--out', '--shard_tokens'],
    'data.train_tokenizer': ['--input', '--vocab_size', '--out'],
    'train.tasks': ['convert', 'FORMAT', 'IN', 'OUT', '--labels'],
    'train.coord_check': ['--config', '--widths', '--steps', '--out'],
}
# Entries whose command line is configs.cli or absl here. train.sample and
# model.hf join this list when they move from argparse to absl.
ABSL_ENTRIES = ENTRIES


def run(argv, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('ABLAX_DEBUG', None)
  return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, **kwargs)


def run_all(commands):
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return list(pool.map(run, commands))


def test_every_entry_has_a_help_a_user_can_act_on():
  results = run_all([['-m', entry, '--help'] for entry in ENTRIES])
  failures = []
  for (entry, names), result in zip(ENTRIES.items(), results):
    missing = [n for n in names if n not in result.stdout]
    if entry != 'model.hf' and f'python -m {entry}' not in result.stdout:
      missing.append(f'an example `python -m {entry}` command')
    if result.returncode != 0 or missing:
      failures.append(f'{entry}: exit {result.returncode}, missing {missing}\n'
                      f'{result.stdout[-800:]}{result.stderr[-800:]}')
  assert not failures, '\n\n'.join(failures)


def test_an_unknown_flag_is_one_line_and_status_2():
  results = run_all([['-m', entry, '--no_such_flag=1'] for entry in ABSL_ENTRIES])
  failures = []
  for entry, result in zip(ABSL_ENTRIES, results):
    lines = [line for line in result.stderr.splitlines() if line.startswith('ablax:')]
    if (result.returncode != 2 or len(lines) != 1 or 'no_such_flag' not in lines[0]
        or 'Traceback' in result.stderr):
      failures.append(f'{entry}: exit {result.returncode}\n{result.stderr[-800:]}')
  assert not failures, '\n\n'.join(failures)


def test_overrides_typed_none_booleans_and_dicts_in_python_m_train():
  """`python -m train`'s own flag parser (absl + config_flags), in a subprocess
  so that absl's global FLAGS stay out of this one."""
  script = textwrap.dedent('''
      import json, sys
      import train.__main__
      from absl import flags
      from configs import errors
      errors._parse_absl_flags(sys.argv)
      c = flags.FLAGS.config
      print(json.dumps([c.train.spike_threshold, c.train.loss_chunk_size, c.train.b1,
                        c.model.head_dim, c.model.qk_norm, c.model.rope_scaling.to_dict()
                        if hasattr(c.model.rope_scaling, 'to_dict') else
                        c.model.rope_scaling, c.train.steps]))
  ''')
  argv = ['-c', script, '--config', 'configs/llama.py:tiny', '--workdir', '/unused',
          '--config.train.spike_threshold=3', '--config.train.spike_threshold=None',
          '--config.train.loss_chunk_size=None', '--config.train.b1=None',
          '--config.model.head_dim=None', '--config.model.qk_norm=true',
          "--config.model.rope_scaling={'type': 'linear', 'factor': 2.0}",
          '--config.train.steps', '7']
  result = run(argv)
  assert result.returncode == 0, result.stderr[-2000:]
  values = json.loads(result.stdout.strip().splitlines()[-1])
  assert values == [None, None, None, None, True, {'type': 'linear', 'factor': 2.0}, 7]


def test_a_bad_override_value_names_the_field_and_its_type():
  result = run(['-m', 'train', '--config', 'configs/llama.py:tiny', '--workdir', '/unused',
                '--config.train.spike_threshold=high'])
  lines = [line for line in result.stderr.splitlines() if line.startswith('ablax:')]
  assert result.returncode == 2
  assert lines == ["ablax: train.spike_threshold='high': expected float or None"]


@pytest.mark.parametrize('path,field_type', [
    ('train.spike_threshold', float), ('train.loss_chunk_size', int), ('train.b1', float),
    ('model.head_dim', int)])
def test_none_and_a_value_for_a_typed_none_field(path, field_type):
  cfg = configs.load_file('configs/llama.py:tiny')
  section, leaf = path.split('.')
  assert cfg[section].get_ref(leaf).get_type() is field_type   # a typed None
  configs.apply_override(cfg, f'{path}=3')
  assert cfg[section][leaf] == field_type(3) and type(cfg[section][leaf]) is field_type
  configs.apply_override(cfg, f'{path}=None')
  assert cfg[section][leaf] is None
  cfg = configs.load('configs/llama.py:tiny', [f'{path}=None'])     # validates too
  assert cfg[section][leaf] is None


def test_split_overrides():
  rest, overrides = cli.split_overrides(
      ['--config', 'c.py:tiny', '--config.a.b=None', '--seeds', '2', '--config.c', '3',
       '--config.d', '--dry-run', '--noconfig.e', '--config.f', '-1', '--', '--config.z=1'])
  assert rest == ['--config', 'c.py:tiny', '--seeds', '2', '--dry-run', '--',
                  '--config.z=1']
  assert overrides == ['a.b=None', 'c=3', 'd=True', 'e=False', 'f=-1']


def test_parse_twice_in_one_process_starts_from_the_defaults():
  fv = flags.FlagValues()
  flags.DEFINE_multi_string('sweep', [], 'an axis', flag_values=fv)
  flags.DEFINE_bool('dry_run', False, 'plan only', flag_values=fv)
  flags.DEFINE_string('config', None, 'the config', flag_values=fv)
  first = cli.parse(fv, ['--sweep', 'a=1,2', '--sweep=b=3', '--dry-run', '--config', 'x',
                         '--config.train.steps=3'], doc='', prog='p',
                    required=('config',), overrides=True, aliases={'dry-run': 'dry_run'})
  assert (first.sweep, first.dry_run, first.overrides) == (
      ['a=1,2', 'b=3'], True, ['train.steps=3'])
  second = cli.parse(fv, ['--config', 'y'], doc='', prog='p', overrides=True)
  assert (second.sweep, second.dry_run, second.config, second.overrides) == (
      [], False, 'y', [])
  with pytest.raises(cli.UsageError, match=r'^--config is required'):
    cli.parse(fv, [], doc='', prog='p', required=('config',))
  with pytest.raises(cli.UsageError, match=r'unknown flag --sweeps; did you mean --sweep\?'):
    cli.parse(fv, ['--sweeps=a=1'], doc='', prog='p')
  with pytest.raises(cli.UsageError, match=r'^expected DIR, got: a b'):
    cli.parse(fv, ['a', 'b'], doc='', prog='p', positional={'DIR': 'a folder'})


def test_an_entry_main_runs_twice_in_one_process(tmp_path, capsys):
  from launch import fit  # pylint: disable=g-import-not-at-top
  table = tmp_path / 'scaling.csv'
  table.write_text('params,tokens,loss\n')
  assert errors.call(fit.main, [str(table), '--predict', '1e6,2e7']) == 2
  assert errors.call(fit.main, [str(table), '--predict', 'x']) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 2 and err[1] == ("ablax: --predict 'x': give N,D (e.g. 1e6,2e7)")
