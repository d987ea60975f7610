"""How a run happens: the typed configs and their check, the command-line wrapper, pretraining
(trainer, checkpoints, resume, launch, hardware), the offline evaluations and export.

This layer composes the ones below it (``moco.data``, ``moco.optim``, the method modules,
``moco.checkpoint``, ``moco.eval``); nothing below imports it.
"""
