"""The six update rules of the source documents, as ``torch.optim.Optimizer`` subclasses, and
LARS for MoCo v3's ResNet pretraining."""

from moco.optim.adagrad import AdaGrad
from moco.optim.adam import Adam
from moco.optim.lars import LARS
from moco.optim.momentum import Momentum
from moco.optim.nesterov import Nesterov
from moco.optim.rmsprop import RMSProp
from moco.optim.sgd import SGD

# Optimizers of pretraining recipes only (the ``_target_`` of their configs). The linear probe
# and the optimizer comparison study the six rules above, so moco.run.check refuses these there.
PRETRAINING_ONLY = ("moco.optim.LARS", "torch.optim.AdamW")

__all__ = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "LARS", "PRETRAINING_ONLY"]
