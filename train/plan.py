"""The memory planner: will this config fit on that topology? `python -m train.plan`.

    python -m train.plan --config configs/llama.py:small --devices 8 --device_kind h100
    python -m train.plan --config configs/llama.py:small --config.mesh.fsdp=-1 \\
        --config.mesh.data=1 --devices 64 --device_kind tpu_v5p

Compiles the trainer's own train step (`train.step.make_train_step` over
`train_state_spec`'s shardings, the same calls as `train/loop.py`) ahead of
time, on abstract inputs (`jax.ShapeDtypeStruct`s carrying their
shardings), for `devices` devices that need not be present, and reports per
device:

- parameters, optimizer state and the rest of the train state, counted
  exactly from the state's shapes and shardings (`NamedSharding.shard_shape`);
- the batch;
- activations and temporaries: XLA's own buffer assignment of the compiled
  step (`compiled.memory_analysis().temp_size_in_bytes`);
- the peak: arguments + outputs - donated aliases + temporaries;
- the FLOPs of the compiled per-device program (`compiled.cost_analysis()`),
  next to the model's analytic count (`model.flops_per_token`);
- the collectives of the compiled HLO (all-reduce, all-gather,
  reduce-scatter, all-to-all, collective-permute): their number and the bytes
  of their results, per kind;
- whether the peak fits the device's memory (`DEVICE_MEMORY_GB` times the
  usable fraction, `USABLE_FRACTION`), and if not, the biggest consumers.

Which compiler plans the step (`target` in the result):
- the target's own backend, when this process sees at least `devices`
  devices of that kind (on the GPU or TPU host itself);
- a TPU topology description (`--topology`, e.g. `v5e:4x4`), compiled for
  TPU without TPUs (`jax.experimental.topologies.get_topology_desc`; needs
  libtpu installed);
- otherwise this host's CPU compiler over `devices` fake CPU devices: the
  sharding, the parameter and optimizer bytes and the collectives are those
  of the target; the temporaries are the CPU compiler's (its fusion and
  buffer reuse differ from GPU and TPU by some tens of percent, and
  `attention_impl='auto'` plans the XLA attention, whose [b, h, t, t]
  scores a flash kernel never holds).

Exit status: 0 when it fits, `EXIT_DOES_NOT_FIT` (4) with a `does not fit`
line naming the biggest consumers when it does not, 2 for a user error.
A sweep calls `plan(cfg, devices, device_kind)` and reads `result['fits']`.
"""

import collections
import math
import os
import re

# Kind -> memory per device in GiB (HBM of one GPU or one TPU chip).
DEVICE_MEMORY_GB = {
    'h100': 80.0,
    'h200': 141.0,
    'a100': 80.0,               # the 40 GB A100: --device_memory_gb=40
    'tpu_v4': 32.0,
    'tpu_v5e': 16.0,
    'tpu_v5p': 95.0,
    'tpu_v6e': 32.0,
    'cpu': None,                # this host's physical memory
}
# The share of a device's memory a step may use. GPUs: JAX preallocates 75%
# (XLA_PYTHON_CLIENT_MEM_FRACTION, default .75); TPUs: the runtime keeps a
# little.
USABLE_FRACTION = {'h100': 0.75, 'h200': 0.75, 'a100': 0.75, 'cpu': 0.9}
TPU_USABLE_FRACTION = 0.95
EXIT_DOES_NOT_FIT = 4
BACKEND_OF_KIND = {'h100': 'gpu', 'h200': 'gpu', 'a100': 'gpu', 'cpu': 'cpu'}

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
               'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
                'f64': 8, 'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1}
_SHAPE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([0-9,]*)\]')
# `%name = SHAPE op(`; async collectives count once, at their -start.
_OP = re.compile(r'=\s*(.+?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')

GiB = 2**30


def device_memory_bytes(device_kind: str, device_memory_gb: float | None = None) -> int:
  """A device's memory in bytes (`device_memory_gb` overrides the table)."""
  import configs  # pylint: disable=g-import-not-at-top
  if device_kind not in DEVICE_MEMORY_GB:
    raise configs.ConfigError(
        f'--device_kind={device_kind!r}: must be one of {", ".join(DEVICE_MEMORY_GB)} '
        '(or give --device_memory_gb for another device)')
  if device_memory_gb is not None:
    if device_memory_gb <= 0:
      raise configs.ConfigError(f'--device_memory_gb={device_memory_gb}: must be positive')
    return int(device_memory_gb * GiB)
  gb = DEVICE_MEMORY_GB[device_kind]
  if gb is None:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return int(gb * GiB)


def usable_fraction(device_kind: str) -> float:
  return USABLE_FRACTION.get(device_kind, TPU_USABLE_FRACTION)


# An HLO computation's header (`%name (...) -> ... {`, `ENTRY %name ...`),
# the computations an instruction calls, and a while loop's trip count.
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%([\w.\-]+)\s')
_CALLS = re.compile(r'\b(body|condition|calls|to_apply|branch_computations)=(\{[^}]*\}|%[\w.\-]+)')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _executions(hlo_text: str) -> dict[str, int]:
  """{computation: how many times one run of the entry computation runs it}.

  A while loop's body runs `known_trip_count` times per run of its caller
  (a scan over layers or microbatches); other calls (fusions, conditionals'
  branches, async wrappers) once. A loop without a known trip count counts
  once.
  """
  calls = collections.defaultdict(list)       # caller -> [(callee, times)]
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith('{'):
      current = header.group(1)
      if line.startswith('ENTRY'):
        entry = current
      continue
    if current is None:
      continue
    trips = _TRIP_COUNT.search(line)
    for kind, names in _CALLS.findall(line):
      times = int(trips.group(1)) if kind == 'body' and trips else 1
      for name in names.strip('{}').split(','):
        calls[current].append((name.strip().lstrip('%'), times))
  runs = collections.Counter()

  def visit(name, times):
    runs[name] += times
    for callee, n in calls.get(name, ()):
      visit(callee, times * n)
  if entry is not None:
    visit(entry, 1)
  return runs


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives one step executes.

  `bytes` sums the result shapes (a tuple's elements added): what each
  device holds after the op, an upper bound of what it sends or receives.
  An op inside a loop body (a scan over layers or microbatches) counts once
  per iteration (the loop's known trip count).
  """
  runs = _executions(hlo_text)
  out = {k: {'count': 0, 'bytes': 0} for k in COLLECTIVES}
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and line.rstrip().endswith('{'):
      current = header.group(1)
      continue
    m = _OP.search(line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3):
      # An async start returns (operands, results[, scratch]): the results
      # are the second half of the tuple's arrays.
      shapes = shapes[len(shapes) // 2:] if len(shapes) > 1 else shapes
    size = sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x)
               for d, dims in shapes)
    times = runs.get(current, 1) if runs else 1
    out[m.group(2)]['count'] += times
    out[m.group(2)]['bytes'] += times * size
  return out


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings
  (the largest shard; shardings here split evenly)."""
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _largest_arrays(tree, n: int = 3) -> list[tuple[str, int]]:
  import jax  # pylint: disable=g-import-not-at-top
  sizes = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                    for k in path)
    shape = leaf.sharding.shard_shape(leaf.shape)
    sizes.append((name, math.prod(shape) * leaf.dtype.itemsize))
  return sorted(sizes, key=lambda s: -s[1])[:n]


def target_devices(devices: int, device_kind: str, topology: str | None = None):
  """(devices to compile for, how they were found)."""
  import jax  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top
  if topology:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    try:
      found = topologies.get_topology_desc(topology, 'tpu').devices
    except Exception as e:  # pylint: disable=broad-except
      raise configs.ConfigError(
          f'--topology={topology!r}: JAX could not describe this TPU topology '
          f'({str(e).splitlines()[0][:200]}); it needs libtpu installed '
          '(pip install jax[tpu]); leave --topology out to plan on CPU devices') from None
    if len(found) != devices:
      raise configs.ConfigError(f'--topology={topology!r} has {len(found)} devices, '
                                f'not --devices={devices}')
    return list(found), f'tpu topology {topology}'
  backend = BACKEND_OF_KIND.get(device_kind, 'tpu')
  try:
    present = jax.devices(backend)
  except RuntimeError:
    present = []
  if backend != 'cpu' and len(present) >= devices:
    return present[:devices], f'{backend} ({present[0].device_kind})'
  cpus = jax.devices('cpu')
  if len(cpus) < devices:
    raise configs.ConfigError(
        f'--devices={devices}: this process has {len(cpus)} CPU devices to plan on; '
        f'set XLA_FLAGS=--xla_force_host_platform_device_count={devices} (or '
        f"jax.config.update('jax_num_cpu_devices', {devices})) before JAX starts; "
        '`python -m train.plan` does it itself')
  return cpus[:devices], f'cpu ({devices} host devices standing in for {device_kind})'


def _abstract_batch(cfg, mesh):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  t = cfg.train
  shape, rows = (t.global_batch_size, t.seq_len), sharding.batch_sharding(mesh)
  spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  return {'inputs': spec(jnp.int32), 'targets': spec(jnp.int32),
          'segment_ids': spec(jnp.int32), 'positions': spec(jnp.int32),
          'loss_mask': spec(jnp.float32)}


def compile_train_step(cfg, devices):
  """The trainer's train step compiled for `devices` on abstract inputs.

  Returns (compiled, abstract_state, abstract_batch, mesh). Built with the
  calls `train/loop.py` makes: `mesh.make_mesh`, `step.train_state_spec`,
  `step.lm_loss`, `step.make_train_step`.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import model as model_lib  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import optim  # pylint: disable=g-import-not-at-top
  from train import sharding  # pylint: disable=g-import-not-at-top
  from train import step as step_lib  # pylint: disable=g-import-not-at-top
  t = cfg.train
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  sharding.check_batch(mesh, t.global_batch_size, t.grad_accum_steps)
  optimizer, schedule = optim.make_optimizer(t, cfg.model)
  graphdef, _, abstract_state, state_shardings = step_lib.train_state_spec(
      lambda: model_lib.Decoder(cfg.model, rngs=nnx.Rngs(t.seed)), optimizer, mesh, t.seed)
  train_step = step_lib.make_train_step(
      step_lib.lm_loss(t), optimizer, graphdef=graphdef, state_shardings=state_shardings,
      mesh=mesh, grad_accum_steps=t.grad_accum_steps, schedule=schedule)
  batch = _abstract_batch(cfg, mesh)
  compiled = train_step.lower(abstract_state, batch).compile()
  return compiled, abstract_state, batch, mesh


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):       # older JAX: one dict per program
    cost = cost[0] if cost else None
  return None if not cost or 'flops' not in cost else float(cost['flops'])


def plan(cfg, devices: int, device_kind: str, *, device_memory_gb: float | None = None,
         topology: str | None = None) -> dict:
  """Plans one train step of `cfg` on `devices` devices of `device_kind`.

  `device_kind` is a key of `DEVICE_MEMORY_GB`; `device_memory_gb` overrides
  its memory; `topology` names a TPU topology to compile for (see the module
  doc). Returns a dict of per-device figures in bytes:

      params, opt_state, other_state, batch      exact, from shapes and shardings
      temp                                        activations and temporaries (XLA)
      outputs_not_donated                         outputs that do not reuse an input
      peak                                        the sum of the above
      compiled_peak                               argument + output - alias + temp (XLA)
      device_memory, usable_memory, fits          usable = memory x USABLE_FRACTION
      consumers                                   [(what, bytes)], biggest first
      flops, model_flops                          per device per step (compiled / analytic)
      collectives                                 {kind: {count, bytes}} of the HLO
      mesh, target                                the mesh shape; what compiled the step
  """
  import configs  # pylint: disable=g-import-not-at-top
  import model as model_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(devices, int) or devices < 1:
    raise configs.ConfigError(f'--devices={devices!r}: must be a positive integer')
  memory = device_memory_bytes(device_kind, device_memory_gb)
  usable = int(memory * usable_fraction(device_kind))
  found, target = target_devices(devices, device_kind, topology)
  compiled, state, batch, mesh = compile_train_step(cfg, found)

  stats = compiled.memory_analysis()
  argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  params = _per_device_bytes(state['params'])
  opt_state = _per_device_bytes(state['opt_state'])
  other = _per_device_bytes({k: v for k, v in state.items()
                             if k not in ('params', 'opt_state')})
  batch_bytes = _per_device_bytes(batch)
  # Outputs that do not reuse a donated input (the metrics, and state leaves
  # XLA could not alias) live beside the arguments.
  not_donated = max(output - alias, 0)
  peak = params + opt_state + other + batch_bytes + not_donated + temp

  consumers = [('activations and temporaries', temp), ('optimizer state', opt_state),
               ('parameters', params), ('batch', batch_bytes),
               ('other state and outputs', other + not_donated)]
  consumers.sort(key=lambda c: -c[1])
  t = cfg.train
  tokens = t.global_batch_size * t.seq_len
  return {
      'device_kind': device_kind, 'devices': devices, 'target': target,
      'mesh': dict(mesh.shape),
      'params': params, 'opt_state': opt_state, 'other_state': other,
      'batch': batch_bytes, 'temp': temp, 'outputs_not_donated': not_donated,
      'peak': peak, 'compiled_peak': argument + output - alias + temp,
      'device_memory': memory, 'usable_memory': usable, 'fits': peak <= usable,
      'consumers': consumers,
      'largest_arrays': _largest_arrays({'params': state['params'],
                                         'opt_state': state['opt_state']}),
      'flops': _flops(compiled),
      'model_flops': model_lib.flops_per_token(cfg.model, t.seq_len) * tokens / devices,
      'collectives': collective_bytes(compiled.as_text()),
  }


def _gib(n: float) -> str:
  if n >= GiB:
    return f'{n / GiB:,.2f} GiB'
  return f'{n / 2**20:,.1f} MiB'


def report(result: dict) -> str:
  """The plan as the lines `python -m train.plan` prints."""
  r = result
  mesh = ' x '.join(f'{a}={n}' for a, n in r['mesh'].items() if n > 1) or 'one device'
  lines = [f'plan: {r["devices"]} x {r["device_kind"]}, mesh {mesh}; compiled on {r["target"]}',
           'per device:']
  rows = [('parameters', r['params']), ('optimizer state', r['opt_state']),
          ('other state (step, rng, ...)', r['other_state']), ('batch', r['batch']),
          ('activations and temporaries', r['temp']),
          ('outputs not donated', r['outputs_not_donated']), ('peak', r['peak'])]
  for name, value in rows:
    lines.append(f'  {name:30s} {_gib(value):>14s}')
  lines.append(f'  {"(XLA: arg + out - alias + temp)":30s} {_gib(r["compiled_peak"]):>14s}')
  lines.append(f'  {"device memory":30s} {_gib(r["device_memory"]):>14s}  '
               f'(usable {_gib(r["usable_memory"])})')
  if r['flops'] is not None:
    lines.append(f'FLOPs per device per step: {r["flops"]:.4g} compiled, '
                 f'{r["model_flops"]:.4g} by model.flops_per_token')
  lines.append('collectives per step (count, result bytes; loop bodies times their trip count):')
  for kind, c in r['collectives'].items():
    if c['count']:
      lines.append(f'  {kind:20s} {c["count"]:5d} {_gib(c["bytes"]):>14s}')
  if not any(c['count'] for c in r['collectives'].values()):
    lines.append('  none')
  if r['fits']:
    lines.append(f'fits: peak {_gib(r["peak"])} of {_gib(r["usable_memory"])} usable '
                 f'({100 * r["peak"] / r["usable_memory"]:.0f}%)')
  else:
    biggest = ', '.join(f'{name} {_gib(v)}' for name, v in r['consumers'][:3])
    arrays = ', '.join(f'{name} {_gib(v)}' for name, v in r['largest_arrays'])
    lines.append(f'does not fit: peak {_gib(r["peak"])} > {_gib(r["usable_memory"])} '
                 f'usable on {r["device_kind"]}; biggest consumers: {biggest}; '
                 f'largest state arrays per device: {arrays}')
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# `python -m train.plan`. The flags are defined when it runs, not on import,
# so a sweep (which has its own --config) can import `plan`.


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/llama.py:small.',
                                  lock_config=True)
  flags.DEFINE_integer('devices', None, 'How many devices the run will have.')
  flags.DEFINE_string('device_kind', None, 'One of ' + ', '.join(DEVICE_MEMORY_GB) + '.')
  flags.DEFINE_float('device_memory_gb', None, 'Memory per device in GiB (default: '
                     'the table for --device_kind).')
  flags.DEFINE_string('topology', None, 'A TPU topology to compile for (e.g. v5e:4x4; '
                      'needs libtpu). Default: this host\'s CPU as fake devices.')
  flags.mark_flags_as_required(['config', 'devices', 'device_kind'])


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  import jax  # pylint: disable=g-import-not-at-top
  # Enough fake CPU devices to stand in for the target; before any backend starts.
  if f.devices and f.devices > 0 and 'xla_force_host_platform_device_count' not in \
      os.environ.get('XLA_FLAGS', ''):
    jax.config.update('jax_num_cpu_devices', f.devices)
  import configs  # pylint: disable=g-import-not-at-top
  from train import metrics  # pylint: disable=g-import-not-at-top
  metrics.configure_logging()
  cfg = f.config
  configs.validate(cfg)
  result = plan(cfg, f.devices, f.device_kind, device_memory_gb=f.device_memory_gb,
                topology=f.topology)
  print(report(result))
  return 0 if result['fits'] else EXIT_DOES_NOT_FIT


def run():
  from configs import errors  # pylint: disable=g-import-not-at-top
  _define_flags()
  errors.run(main)


if __name__ == '__main__':
  run()
