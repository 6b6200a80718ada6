"""Metrics: TensorBoard event files, the console line and progress bar, MFU,
and the console's log filter.

- `SummaryWriter` writes scalar summaries into `DIR/events.out.tfevents.*` with
  the `tensorboard` package alone (its `EventFileWriter` and protos; no
  TensorFlow). Only process 0 writes. Tags follow the contract: `train/loss`,
  `train/learning_rate`, `train/grad_norm`, `train/tokens_per_second`,
  `train/mfu`, `eval/loss`, `eval/perplexity`, and for MoE models
  `train/moe_aux_loss`, `train/moe_router_z_loss`, `train/moe_expert_load_max`;
  with `data.mixture`, `data/tokens/<name>` (tokens seen per source) and
  `eval/<name>/loss` per source (`eval/loss` is then their weighted mean).
- `Console` prints one readable line every `log_every_steps` (with an ETA)
  and, on a terminal, a tqdm progress bar.
- MFU, model FLOPs utilisation (PaLM, Chowdhery et al. 2022, appendix B):
  achieved training FLOPs per second (`model.flops_per_token` x tokens per
  second) over the peak of the devices. Peaks are the dense bf16 figures of
  the vendors' data sheets (`PEAK_FLOPS`); on a CPU there is no data sheet, so
  the peak is a float32 matmul rate measured once per process on the host (all
  of a host's fake CPU devices share its cores, so the peak counts once per
  process, not once per fake device).
- `configure_logging()`: INFO lines from ablax's own files only (orbax alone
  logs a dozen per checkpoint), WARNING and up from the libraries.
"""

import datetime
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _OwnInfoOnly:
  """A log filter: INFO from ablax's own files, WARNING and up from libraries."""

  PACKAGES = ('configs', 'model', 'train', 'data', 'align', 'launch', 'bench')

  def filter(self, record) -> bool:
    if record.levelno >= 30:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_REPO + os.sep) and (
        os.path.relpath(path, _REPO).split(os.sep)[0] in self.PACKAGES)


def configure_logging() -> None:
  """Keeps the console readable: see `_OwnInfoOnly`. Entry points call it."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
  for name in ('orbax', 'jax', 'grain'):
    std_logging.getLogger(name).addFilter(_OwnInfoOnly())


# Dense bf16 peak FLOP/s per device, matched as substrings of
# `device.device_kind` in this order (the more specific names first).
PEAK_FLOPS = (
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),     # v5e
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),     # v6e (Trillium)
    ('TPU v6e', 918e12),
    ('TPU7x', 2307e12),
    ('A100', 312e12),
    ('H100', 989e12),            # SXM; the PCIe card is slower
    ('H200', 989e12),
)


def peak_flops_per_device(device: jax.Device) -> float | None:
  """The table's peak for an accelerator, or None if the kind is unknown."""
  kind = device.device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


@functools.cache
def measured_cpu_flops(size: int = 1024, seconds: float = 0.3) -> float:
  """FLOP/s of a jitted float32 [size, size] matmul on this host's CPU."""
  device = jax.devices('cpu')[0]
  a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  runs, start = 0, time.perf_counter()
  while True:
    matmul(a).block_until_ready()
    runs += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return 2 * size**3 * runs / elapsed


def peak_flops(devices=None) -> float:
  """Total peak FLOP/s of `devices` (default: all devices of the job)."""
  devices = list(jax.devices() if devices is None else devices)
  if devices[0].platform == 'cpu':
    processes = len({d.process_index for d in devices})
    return measured_cpu_flops() * processes
  per_device = peak_flops_per_device(devices[0])
  if per_device is None:
    logging.warning('no peak FLOP/s known for %r; MFU is reported as 0',
                    devices[0].device_kind)
    return math.inf
  return per_device * len(devices)


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' `peak`.

  `flops_per_token` counts the model FLOPs a step spends per token it reads
  (`model.flops_per_token` for training: forward + backward), so
  tokens/s x FLOPs/token is the achieved rate, whatever the recomputation
  (remat) or padding actually costs.
  """
  return tokens_per_second * flops_per_token / peak


class SummaryWriter:
  """Scalars into TensorBoard event files; a no-op on processes other than 0."""

  def __init__(self, logdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = EventFileWriter(logdir, flush_secs=10) if self.enabled else None

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        for tag, value in values.items()])
    self._writer.add_event(
        event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def text(self, step: int, tag: str, text: str) -> None:
    """A text summary (TensorBoard's Text tab), e.g. the resolved config."""
    if not self.enabled:
      return
    from tensorboard.plugins.text import metadata as text_metadata  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2  # pylint: disable=g-import-not-at-top
    tensor = tensor_pb2.TensorProto(
        dtype=7,                 # DT_STRING
        tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        string_val=[text.encode()])
    value = summary_pb2.Summary.Value(
        tag=tag, tensor=tensor,
        metadata=text_metadata.create_summary_metadata(display_name=tag,
                                                       description=''))
    self._writer.add_event(event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=summary_pb2.Summary(value=[value])))

  def flush(self) -> None:
    if self.enabled:
      self._writer.flush()

  def close(self) -> None:
    if self.enabled:
      self._writer.close()


def train_scalars(metrics: dict, *, num_experts: int = 0) -> dict[str, float]:
  """The step's metrics (host values) under their contract tags."""
  out = {
      'train/loss': metrics['loss'],
      'train/learning_rate': metrics['learning_rate'],
      'train/grad_norm': metrics['grad_norm'],
  }
  if 'z_loss' in metrics:
    out['train/z_loss'] = metrics['z_loss']
  if 'moe_aux_loss' in metrics:
    out['train/moe_aux_loss'] = metrics['moe_aux_loss']
    out['train/moe_router_z_loss'] = metrics['moe_router_z_loss']
    load = np.asarray(metrics['moe_expert_load'])
    # 1.0 is perfect balance; num_experts means one expert takes every token.
    out['train/moe_expert_load_max'] = float(load.max() * (num_experts or load.size))
  for key in metrics:
    if key.startswith('mtp_loss'):      # mtp_loss and mtp_loss_<k> (model.mtp_depth)
      out[f'train/{key}'] = metrics[key]
  return {k: float(v) for k, v in out.items()}


# The console lines' fields: (name under the tag prefix, format), shown when
# logged. Another stage (DPO) passes its own.
TRAIN_LINE = (('loss', 'loss {:.4f}'), ('learning_rate', 'lr {:.2e}'),
              ('grad_norm', 'grad_norm {:.3f}'), ('tokens_per_second', '{:,.0f} tok/s'),
              ('mfu', 'mfu {:.1%}'), ('moe_expert_load_max', 'load_max {:.2f}'))
EVAL_LINE = (('loss', 'loss {:.4f}'), ('perplexity', 'perplexity {:.2f}'))


def _fields(scalars: dict[str, float], prefix: str, fields) -> list[str]:
  return [form.format(scalars[f'{prefix}/{name}']) for name, form in fields
          if f'{prefix}/{name}' in scalars]


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  return str(datetime.timedelta(seconds=int(seconds)))


class Console:
  """A log line every few steps and, on a terminal, a tqdm bar with ETA.

  Only process 0 prints. The ETA extrapolates the measured time per step of
  this run (compilation excluded: the clock starts after the first step).
  """

  def __init__(self, total_steps: int, start_step: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total = total_steps
    self._t0 = None
    self._s0 = start_step
    self._bar = None
    if self.enabled and sys.stderr.isatty() and not os.environ.get('ABLAX_NO_BAR'):
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                            dynamic_ncols=True, leave=False)

  def step(self, step: int) -> None:
    if self._t0 is None:
      self._t0, self._s0 = time.perf_counter(), step
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def eta(self, step: int) -> float:
    if self._t0 is None or step <= self._s0:
      return math.inf
    rate = (time.perf_counter() - self._t0) / (step - self._s0)
    return rate * (self.total - step)

  def print(self, line: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(line)
    else:
      print(line, flush=True)

  def train_line(self, step: int, scalars: dict[str, float], prefix: str = 'train',
                 fields=None) -> None:
    """`step 120/200 | loss 2.8312 | ... | eta 0:00:10`: the `fields` ((tag
    name, format) pairs, default `TRAIN_LINE`) of `scalars` under `prefix/`."""
    parts = [f'step {step:>{len(str(self.total))}d}/{self.total}']
    parts += _fields(scalars, prefix, TRAIN_LINE if fields is None else fields)
    parts.append(f'eta {_duration(self.eta(step))}')
    self.print(' | '.join(parts))

  def eval_line(self, step: int, scalars: dict[str, float], prefix: str = 'eval',
                fields=None) -> None:
    self.print(f'eval @ step {step}: ' + ' | '.join(
        _fields(scalars, prefix, EVAL_LINE if fields is None else fields)))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def source_token_scalars(tokens_seen: dict, process_count: int = 1) -> dict:
  """`data/tokens/<name>`: input tokens seen per mixture source since step 0.

  `tokens_seen` counts this process's rows; with several processes the
  figure is scaled by their number (each holds an equal share of the rows).
  """
  return {f'data/tokens/{name}': float(n * process_count)
          for name, n in tokens_seen.items()}


def eval_scalars(run_eval, sources) -> dict:
  """Eval scalars from `run_eval(source) -> {'loss': ...}` over `sources`,
  `[(name, weight), ...]` (`data.pipeline.eval_sources`).

  One unnamed source: `eval/loss`, `eval/perplexity`. A mixture:
  `eval/<name>/loss` per source, and `eval/loss` their mean weighted by the
  mixture weights (`eval/perplexity` its exp).
  """
  if [name for name, _ in sources] == [None]:
    scalars = run_eval(None)
    return {'eval/loss': scalars['loss'], 'eval/perplexity': scalars['perplexity']}
  out, total = {}, 0.0
  for name, weight in sources:
    loss = run_eval(name)['loss']
    out[f'eval/{name}/loss'] = loss
    total += weight * loss
  out['eval/loss'] = total / sum(w for _, w in sources)
  out['eval/perplexity'] = math.exp(out['eval/loss'])
  return out
