"""`python -m launch.fit TABLE.csv [--predict N,D]`: scaling laws from measured runs.

    python -m launch.compare /tmp/ladder --scaling     # writes /tmp/ladder/scaling.csv
    python -m launch.fit /tmp/ladder/scaling.csv --predict 1e6,2e7

TABLE.csv has columns `params` (non-embedding parameters N), `tokens` (tokens
trained D) and `loss`, and optionally `budget` (the run's compute C; without
it C = 6 N D, grouped within 5%). Two fits, as Hoffmann et al. 2022
("Training Compute-Optimal Large Language Models"):

- approach 3, the parametric law L(N, D) = E + A / N^alpha + B / D^beta: the
  Huber loss (delta 1e-3) of log L_fit - log L_measured, minimised over
  (log A, log B, log E, alpha, beta) with L-BFGS from the best 12 points
  of Hoffmann et al.'s grid of initialisations, the best result kept. Its compute-optimal allocation under C = 6 N D is
  N_opt ∝ C^a, D_opt ∝ C^b with a = beta / (alpha + beta), b = alpha / (alpha + beta).
- approach 2, per budget a parabola of loss against log N; its minimum is
  N_opt(C) (D_opt(C) from the budget's log D against log N line); the slopes of
  log N_opt and log D_opt against log C, over the budgets whose minimum lies
  inside the sizes run, are the exponents (`approach2`).

Writes `fit.json` (E, A, alpha, B, beta, a, b, residuals, approach2) and
`fit.png` (isoFLOP curves with the fitted law, and the compute-optimal
frontier) next to TABLE.csv; `--predict N,D` prints the law's loss there.
A table with an `arm` column of several arms (a ladder per arm, `launch.scaling
--sweep`) is fitted per arm (`fit_<arm>.png`; fit.json {"arms": {arm: ...}});
`--budget C` prints each arm's loss at its compute-optimal N, D for C FLOPs
and the gap to the first arm: does the change still win at 10x the compute?
"""

import csv
import itertools
import json
import math
import os
import sys

import numpy as np

from absl import flags

import configs
from configs import cli
from configs import errors

HUBER_DELTA = 1e-3
STARTS = 12


class FitError(configs.UserError):
  """A table that cannot be fitted; the message says what is missing."""


def read_table(path: str) -> dict[str, np.ndarray]:
  try:
    with open(path, newline='') as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise FitError(f'{path}: {e.strerror}') from None
  need = ('params', 'tokens', 'loss')
  if not rows or any(c not in rows[0] for c in need):
    raise FitError(f'{path}: needs columns params, tokens, loss (python -m launch.compare '
                   'DIR --scaling writes them)')
  table = {c: np.asarray([float(r[c]) for r in rows]) for c in need}
  if 'budget' in rows[0] and all(r['budget'] for r in rows):
    table['budget'] = np.asarray([float(r['budget']) for r in rows])
  if 'arm' in rows[0] and len({r['arm'] for r in rows}) > 1:
    table['arm'] = np.asarray([r['arm'] for r in rows])
  if len(rows) < 5:
    raise FitError(f'{path}: {len(rows)} rows; the law has 5 parameters')
  return table


# ----------------------------------------------------------------------------
# Approach 3: the parametric law.


def law(params: dict, n, d):
  return params['E'] + params['A'] / np.power(n, params['alpha']) + (
      params['B'] / np.power(d, params['beta']))


def _objective(theta, log_n, log_d, log_loss, delta=HUBER_DELTA):
  """Huber(delta) of logsumexp(a - alpha log N, b - beta log D, e) - log L, and its gradient."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top = terms.max(0)
  weights = np.exp(terms - top)
  total = weights.sum(0)
  r = top + np.log(total) - log_loss
  small = np.abs(r) <= delta
  value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
  dr = np.where(small, r, delta * np.sign(r))
  p = weights / total                                   # softmax over the three terms
  grad = np.array([(dr * p[0]).sum(), (dr * p[1]).sum(), (dr * p[2]).sum(),
                   (dr * p[0] * -log_n).sum(), (dr * p[1] * -log_d).sum()])
  return value, grad


def fit_law(n, d, loss) -> dict:
  """The parametric law by approach 3 (see the module docstring)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
  # The initial grid of Hoffmann et al. (their Appendix D.2): 4,500 points,
  # screened by the objective; L-BFGS runs from the best STARTS of them.
  grid = np.asarray(list(itertools.product(
      np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5),
      np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))))       # a, b, e, alpha, beta
  screened = sorted(grid, key=lambda theta: _objective(theta, log_n, log_d, log_loss)[0])
  best = None
  for theta in screened[:STARTS]:
    # Huber with delta 1e-3 is nearly the absolute value, whose kink stalls
    # L-BFGS far from the optimum: a least-squares descent (delta = inf) first.
    theta = optimize.minimize(_objective, theta, args=(log_n, log_d, log_loss, math.inf),
                              jac=True, method='L-BFGS-B', options={'maxiter': 2000}).x
    result = optimize.minimize(_objective, theta, args=(log_n, log_d, log_loss), jac=True,
                               method='L-BFGS-B', options={'maxiter': 2000})
    if best is None or result.fun < best.fun:
      best = result
  a, b, e, alpha, beta = best.x
  params = {'E': math.exp(e), 'A': math.exp(a), 'alpha': float(alpha), 'B': math.exp(b),
            'beta': float(beta)}
  params['a'] = params['beta'] / (params['alpha'] + params['beta'])
  params['b'] = params['alpha'] / (params['alpha'] + params['beta'])
  params['residuals'] = (np.log(law(params, n, d)) - log_loss).tolist()
  params['huber_loss'] = float(best.fun)
  return params


def optimal_allocation(params: dict, budget: float) -> tuple[float, float]:
  """(N_opt, D_opt) of the law at compute C = 6 N D (Hoffmann et al., eq. 4)."""
  alpha, beta = params['alpha'], params['beta']
  g = (alpha * params['A'] / (beta * params['B'])) ** (1 / (alpha + beta))
  n = g * (budget / 6) ** params['a']
  return n, budget / (6 * n)


# ----------------------------------------------------------------------------
# Approach 2: parabolas per budget.


def group_budgets(table) -> list[np.ndarray]:
  """Row indices per compute budget (the `budget` column, or 6 N D within 5%)."""
  c = table.get('budget', 6 * table['params'] * table['tokens'])
  order = np.argsort(c)
  groups, current = [], [order[0]]
  for i in order[1:]:
    if c[i] / c[current[0]] < 1.05:
      current.append(i)
    else:
      groups.append(np.asarray(current))
      current = [i]
  groups.append(np.asarray(current))
  return groups


def fit_isoflops(table) -> dict:
  c = table.get('budget', 6 * table['params'] * table['tokens'])
  budgets = []
  for rows in group_budgets(table):
    if len(rows) < 3:
      continue
    log_n, log_d, loss = (np.log(table['params'][rows]), np.log(table['tokens'][rows]),
                          table['loss'][rows])
    k2, k1, k0 = np.polyfit(log_n, loss, 2)
    if k2 <= 0:
      continue            # no minimum: the sizes do not bracket the optimum
    best = -k1 / (2 * k2)
    slope, intercept = np.polyfit(log_n, log_d, 1)
    budgets.append({'budget': float(np.exp(np.log(c[rows]).mean())),
                    'n_opt': float(np.exp(best)), 'd_opt': float(np.exp(slope * best + intercept)),
                    'loss_opt': float(k0 + k1 * best + k2 * best**2),
                    'parabola': [float(k2), float(k1), float(k0)],
                    'bracketed': bool(log_n.min() <= best <= log_n.max())})
  out = {'budgets': budgets, 'a': None, 'b': None}
  # Only minima inside the sizes run: an extrapolated one says little.
  inside = [b for b in budgets if b['bracketed']]
  if len(inside) >= 2:
    log_c = np.log([b['budget'] for b in inside])
    out['a'] = float(np.polyfit(log_c, np.log([b['n_opt'] for b in inside]), 1)[0])
    out['b'] = float(np.polyfit(log_c, np.log([b['d_opt'] for b in inside]), 1)[0])
  return out


# ----------------------------------------------------------------------------
# The figure and the command.


def plot(table, result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  c = table.get('budget', 6 * table['params'] * table['tokens'])
  for rows in group_budgets(table):
    budget = float(np.exp(np.log(c[rows]).mean()))
    order = rows[np.argsort(table['params'][rows])]
    n, d = table['params'][order], table['tokens'][order]
    dots = left.plot(n, table['loss'][order], 'o', label=f'C = {budget:.2g}')[0]
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 50)
    slope, intercept = np.polyfit(np.log(n), np.log(d), 1)
    left.plot(grid, law(result, grid, np.exp(slope * np.log(grid) + intercept)), '--',
              color=dots.get_color())
  for b in result['approach2']['budgets']:
    left.plot(b['n_opt'], b['loss_opt'], 'k*', markersize=10)
  left.set_xscale('log')
  left.set_xlabel('non-embedding parameters N')
  left.set_ylabel('loss')
  left.set_title('isoFLOP curves: runs (dots), fitted law (dashed), parabola minima (*)')
  left.legend(fontsize='small')
  budgets = np.geomspace(c.min() / 3, c.max() * 30, 50)
  right.plot(budgets, [optimal_allocation(result, x)[0] for x in budgets],
             label=f'law: N_opt ∝ C^{result["a"]:.2f}')
  approach2 = result['approach2']['budgets']
  if approach2:
    right.plot([b['budget'] for b in approach2], [b['n_opt'] for b in approach2], 'k*',
               markersize=10, label='parabola minima'
               + (f' (∝ C^{result["approach2"]["a"]:.2f})'
                  if result['approach2']['a'] is not None else ''))
  right.set_xscale('log')
  right.set_yscale('log')
  right.set_xlabel('compute C (FLOPs)')
  right.set_ylabel('N_opt')
  right.set_title('compute-optimal frontier')
  right.legend(fontsize='small')
  for ax in (left, right):
    ax.grid(True, which='both', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def fit_table(table, out) -> dict:
  """Both fits of one table (one arm), printed to `out`."""
  result = fit_law(table['params'], table['tokens'], table['loss'])
  result['approach2'] = fit_isoflops(table)
  rms = math.sqrt(np.mean(np.square(result['residuals'])))
  out.write(f'L(N, D) = {result["E"]:.4f} + {result["A"]:.4g} / N^{result["alpha"]:.4f}'
            f' + {result["B"]:.4g} / D^{result["beta"]:.4f}   '
            f'(rms log residual {rms:.4f}, {len(table["loss"])} runs)\n'
            f'compute-optimal: N_opt ∝ C^{result["a"]:.3f}, D_opt ∝ C^{result["b"]:.3f}\n')
  a2 = result['approach2']
  for b in a2['budgets']:
    out.write(f'  C = {b["budget"]:.3g}: N_opt {b["n_opt"]:.3g}, D_opt {b["d_opt"]:.3g}, '
              f'loss {b["loss_opt"]:.4f}' + ('' if b['bracketed'] else
                                             '  (outside the sizes run)') + '\n')
  if a2['a'] is not None:
    out.write(f'approach 2: N_opt ∝ C^{a2["a"]:.3f}, D_opt ∝ C^{a2["b"]:.3f}\n')
  else:
    out.write('approach 2: fewer than two budgets have their minimum inside the sizes '
              'run (a parabola needs three sizes per budget, curving upward); no exponents\n')
  return result


def fit(table_path: str, out=None, *, write=True, budget: float | None = None) -> dict:
  """Fits TABLE.csv (per arm when it has several); writes fit.json and fit.png.

  `budget`: with arms, prints each arm's loss at its compute-optimal (N, D)
  for C = `budget` and the gap to the first arm.
  """
  out = out or sys.stdout
  table = read_table(table_path)
  if np.any(table['params'] <= 0) or np.any(table['tokens'] <= 0) or np.any(table['loss'] <= 0):
    raise FitError(f'{table_path}: params, tokens and loss must be positive')
  folder = os.path.dirname(os.path.abspath(table_path))
  if 'arm' not in table:
    result = fit_table(table, out)
    if write:
      with open(os.path.join(folder, 'fit.json'), 'w') as f:
        json.dump(result, f, indent=2)
      plot(table, result, os.path.join(folder, 'fit.png'))
      out.write(f'wrote {os.path.join(folder, "fit.json")}, fit.png\n')
    return result
  arms = list(dict.fromkeys(table['arm']))
  result = {'arms': {}}
  for arm in arms:
    out.write(f'{arm}:\n')
    rows = table['arm'] == arm
    part = {k: v[rows] for k, v in table.items() if k != 'arm'}
    if len(part['loss']) < 5:
      raise FitError(f'{table_path}: arm {arm!r} has {len(part["loss"])} rows; the law '
                     'has 5 parameters')
    result['arms'][arm] = fit_table(part, out)
    if write:
      plot(part, result['arms'][arm], os.path.join(folder, f'fit_{arm}.png'))
  if budget is not None:
    losses = {}
    for arm, r in result['arms'].items():
      n, d = optimal_allocation(r, budget)
      losses[arm] = float(law(r, n, d))
      out.write(f'at C = {budget:.3g}: {arm}: N_opt {n:.3g}, D_opt {d:.3g}, loss '
                f'{losses[arm]:.4f}' + ('' if arm == arms[0] else
                                        f' ({losses[arm] - losses[arms[0]]:+.4f} vs {arms[0]})')
                + '\n')
    result['predicted_at_budget'] = {'budget': budget, 'loss': losses}
  if write:
    with open(os.path.join(folder, 'fit.json'), 'w') as f:
      json.dump(result, f, indent=2)
    out.write(f'wrote {os.path.join(folder, "fit.json")}, fit_<arm>.png\n')
  return result


FLAGS = flags.FlagValues()
flags.DEFINE_string('predict', None, 'N,D: print the fitted loss at N non-embedding '
                    'parameters and D training tokens (e.g. 1e6,2e7)', flag_values=FLAGS)
flags.DEFINE_float('budget', None, "a table with arms: each arm's loss at its "
                   'compute-optimal N, D for this many FLOPs, and the gap to the first arm',
                   flag_values=FLAGS)


def main(argv=None) -> int:
  """`python -m launch.fit TABLE.csv [flags]` (argv without the program name)."""
  args = cli.parse(FLAGS, argv, doc=__doc__, prog='python -m launch.fit',
                   positional={'TABLE': 'a CSV with columns params, tokens, loss '
                               '[, budget, arm], e.g. DIR/scaling.csv of launch.compare '
                               '--scaling'})
  point = None
  if args.predict:
    try:
      point = [float(x) for x in args.predict.split(',')]
      assert len(point) == 2 and min(point) > 0
    except (ValueError, AssertionError):
      raise FitError(f'--predict {args.predict!r}: give N,D (e.g. 1e6,2e7)') from None
  result = fit(args.TABLE, budget=args.budget)
  if point:
    for arm, r in (result['arms'].items() if 'arms' in result else [('', result)]):
      print(f'predicted loss{" of " + arm if arm else ""} at N={point[0]:.3g}, '
            f'D={point[1]:.3g}: {float(law(r, point[0], point[1])):.4f}')
  return 0


if __name__ == '__main__':
  errors.run(main, absl_flags=False)
