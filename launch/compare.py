"""`python -m launch.compare`: run comparison (issue 6), not built yet."""

import sys


def run():
  sys.exit('ablax: run comparison (python -m launch.compare / ablax-compare) is not built yet.')


if __name__ == '__main__':
  run()
