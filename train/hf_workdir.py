"""A Hugging Face folder to an ablax workdir, and back: `python -m model.hf`.

    python -m model.hf import HF_DIR --workdir DIR [--overwrite]
    python -m model.hf export DIR --out HF_DIR [--step STEP]

`import_to_workdir` maps the folder with `model.hf.load` and writes a whole
workdir: `DIR/config.json` (`configs/base.py`'s training and data defaults,
the imported `model`, the folder's `tokenizer.json` as `data.tokenizer` when
there is one, `train.seq_len` cut to the model's `max_seq_len`) and
`DIR/checkpoints/0` (the parameters and a fresh optimizer state, no data
position), so `train`, `align`, `train.sample` and `train.evaluate` take it
like any run. `export_workdir` restores a checkpoint's parameters only
(`train.workdir.load_decoder`) and writes them with `model.hf.save`.
"""

import os
import sys

from absl import flags

import configs
from configs import errors
from model import hf
from train import workdir as workdir_lib

USAGE = ('give a command: `python -m model.hf import HF_DIR --workdir DIR` or '
         '`python -m model.hf export DIR --out HF_DIR` (--help for the flags)')


def workdir_config(hf_dir: str, model_cfg):
  """The whole config of a workdir imported from `hf_dir`: the base defaults
  around `model_cfg`, with the folder's tokenizer and a fitting seq_len."""
  from configs import base  # pylint: disable=g-import-not-at-top
  cfg = base.get_config()
  cfg.model = model_cfg
  tokenizer = os.path.join(os.path.abspath(hf_dir), 'tokenizer.json')
  if os.path.exists(tokenizer):
    cfg.data.tokenizer = 'hf:' + tokenizer
  cfg.train.seq_len = min(cfg.train.seq_len, model_cfg.max_seq_len)
  configs.validate(cfg)
  return cfg


def import_to_workdir(hf_dir: str, workdir: str, overwrite: bool = False):
  """Writes `workdir/config.json` and an orbax checkpoint at step 0; returns
  the config.

  A folder that already holds a run or an import is refused unless
  `overwrite`, which first removes its config.json, checkpoints and
  TensorBoard files.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import model as model_lib  # pylint: disable=g-import-not-at-top
  from configs import base as base_config  # pylint: disable=g-import-not-at-top
  from train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import optim  # pylint: disable=g-import-not-at-top
  from train import step as step_lib  # pylint: disable=g-import-not-at-top
  loaded, decoder = hf.load(hf_dir)
  cfg = workdir_config(hf_dir, loaded.model)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise hf.HFError(f'--workdir {workdir} is a file, not a folder')
  held = [name for name in (workdir_lib.CONFIG_FILE, workdir_lib.CHECKPOINTS)
          if os.path.exists(os.path.join(workdir, name))]
  if held and not overwrite:
    raise hf.HFError(f'--workdir {workdir} already holds a run or an import '
                     f'({", ".join(held)}): give a new folder, or pass --overwrite '
                     'to replace it')
  if held:
    workdir_lib.clear_run(workdir)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  optimizer, _ = optim.make_optimizer(cfg.train)
  # The full train state (a fresh optimizer state around the imported
  # parameters), so `train` resumes from it as from any checkpoint. The
  # checkpoint holds the imported (unrolled) layout; config.json keeps the
  # default `model.scan_layers`, and a resume converts (`workdir.restore`).
  unrolled = cfg.model.copy_and_resolve_references()
  unrolled.scan_layers = False
  cfg.model.scan_layers = base_config.model_config().scan_layers
  _, init, _, shardings = step_lib.train_state_spec(
      lambda: model_lib.Decoder(unrolled, rngs=nnx.Rngs(cfg.train.seed)),
      optimizer, mesh, cfg.train.seed)
  state = jax.jit(init, out_shardings=shardings)()
  state['params'] = jax.device_put(nnx.state(decoder, nnx.Param), shardings['params'])
  with checkpoint_lib.Checkpointer(workdir, every_steps=1,
                                   keep=cfg.train.keep_checkpoints) as ckpt:
    # No data-iterator state: training on from here reads its own data from
    # the start, whatever data config (source, batch, workers) it uses.
    if not ckpt.save(0, state, force=True):
      raise hf.HFError(f'{workdir}: checkpoint 0 was not written')
  workdir_lib.write_config(workdir, cfg)
  return cfg


def export_workdir(workdir: str, hf_dir: str, step: int | None = None):
  """Writes a workdir's newest (or `step`) parameters as a Hugging Face folder."""
  cfg, decoder = workdir_lib.load_decoder(workdir, step)
  hf.save(cfg, decoder, hf_dir)
  return cfg


# ----------------------------------------------------------------------------
# The command line (`python -m model.hf`).


def define_flags() -> None:
  flags.DEFINE_string('workdir', None,
                      'import: the ablax workdir to write (a new or empty folder; '
                      'see --overwrite).')
  flags.DEFINE_bool('overwrite', False,
                    'import: replace a run or an import already in --workdir (its '
                    'config.json, checkpoints and TensorBoard files are deleted).')
  flags.DEFINE_string('out', None,
                      'export: the folder to write config.json and model.safetensors to.')
  flags.DEFINE_integer('step', None,
                       'export: the checkpoint step to export (default: the newest).')


def main(argv):
  """`import HF_DIR` or `export DIR`, with the flags of `define_flags`."""
  values = flags.FLAGS
  args = list(argv[1:])
  if not args or args[0] not in ('import', 'export'):
    raise configs.UserError(f'{args[0]!r} is not a command; {USAGE}' if args else USAGE)
  command, rest = args[0], args[1:]
  if len(rest) != 1:
    what = 'HF_DIR' if command == 'import' else 'DIR'
    raise configs.UserError(
        f'{command} takes one folder ({what}), got {len(rest)}: '
        f'{" ".join(rest) or "none"}; {USAGE}')
  if command == 'import':
    if values.out is not None or values.step is not None:
      raise configs.UserError('--out and --step are for export; import takes '
                              'HF_DIR --workdir DIR [--overwrite]')
    if not values.workdir:
      raise configs.UserError(f'import {rest[0]}: give --workdir DIR, the ablax '
                              'workdir to write')
    import_to_workdir(rest[0], values.workdir, overwrite=values.overwrite)
    print(f'wrote {values.workdir}/config.json and checkpoints/0')
  else:
    if values.workdir is not None or values.overwrite:
      raise configs.UserError('--workdir and --overwrite are for import; export '
                              'takes DIR --out HF_DIR [--step STEP]')
    if not values.out:
      raise configs.UserError(f'export {rest[0]}: give --out HF_DIR, the folder '
                              'to write')
    export_workdir(rest[0], values.out, values.step)
    print(f'wrote {values.out}/config.json and model.safetensors')


def run_as_main() -> None:
  """The `python -m model.hf` entry: flags defined here (not at import, so
  this module can be imported beside other entries' `--workdir`), `--help`
  listing them, errors through `configs.errors.run`."""
  define_flags()
  for name in ('workdir', 'overwrite', 'out', 'step'):
    # Key flags of the main module (model/hf.py): `--help` lists them.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  errors.run(main)


if __name__ == '__main__':
  run_as_main()
