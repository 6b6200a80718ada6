"""Layers point down: nothing under model/ imports the trainer, the stages or
the launchers (STYLE.md 14). Read from the source with `ast`, so an import
inside a function counts as much as one at the top; only a module's
`if __name__ == '__main__':` block (a command line handing over to the
trainer, as `python -m model.hf` does) is exempt."""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABOVE_MODEL = ('train', 'align', 'launch', 'bench')


def _is_main_guard(node) -> bool:
  test = getattr(node, 'test', None)
  return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
          and isinstance(test.left, ast.Name) and test.left.id == '__name__'
          and any(isinstance(c, ast.Constant) and c.value == '__main__'
                  for c in test.comparators))


def imported_modules(source: str):
  """(line, module) of every import in `source` outside a __main__ block,
  `importlib.import_module('...')` with a literal name included."""
  found = []

  def visit(node):
    if _is_main_guard(node):
      return
    if isinstance(node, ast.Import):
      found.extend((node.lineno, alias.name) for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.append((node.lineno, node.module))
    elif (isinstance(node, ast.Call) and getattr(node.func, 'attr', None) == 'import_module'
          and node.args and isinstance(node.args[0], ast.Constant)):
      found.append((node.lineno, str(node.args[0].value)))
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(ast.parse(source))
  return found


def test_the_checker_sees_imports_anywhere_but_a_main_block():
  source = ('import os\nfrom train import step\n'
            'def f():\n  import launch.sweep\n  return importlib.import_module("align.loop")\n'
            'if __name__ == "__main__":\n  from train import hf_workdir\n')
  assert [m for _, m in imported_modules(source)] == [
      'os', 'train', 'launch.sweep', 'align.loop']


def test_model_imports_nothing_above_it():
  upward = []
  for root, _, files in os.walk(os.path.join(REPO, 'model')):
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      path = os.path.join(root, name)
      with open(path) as f:
        for line, module in imported_modules(f.read()):
          if module.split('.')[0] in ABOVE_MODEL:
            upward.append(f'{os.path.relpath(path, REPO)}:{line}: imports {module}')
  assert not upward, '\n'.join(upward)
