"""`python -m align`: the DPO stage (issue 5), not built yet."""

import sys


def run():
  sys.exit('ablax: the DPO stage (python -m align / ablax-dpo) is not built yet.')


if __name__ == '__main__':
  run()
