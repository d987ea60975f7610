"""Tools that sit on top of the package: the training-speed benchmark (``moco.tools.benchmark``,
behind ``scripts/benchmark.py``) and the optimizer demonstrations (``moco.tools.optimizer_demo``,
behind ``scripts/optimizer_demo.py``). They use the package the way a user would, through its
public names, and nothing in ``moco/`` outside ``moco/tools`` imports them: training, evaluation
and export never depend on a tool, and a tool can change without touching them.
"""
