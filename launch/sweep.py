"""`python -m launch.sweep`: ablation sweeps (issue 6), not built yet."""

import sys


def run():
  sys.exit('ablax: sweeps (python -m launch.sweep / ablax-sweep) are not built yet.')


if __name__ == '__main__':
  run()
