"""The six update rules of the source documents, as ``torch.optim.Optimizer`` subclasses."""

from moco.optim.adagrad import AdaGrad
from moco.optim.adam import Adam
from moco.optim.momentum import Momentum
from moco.optim.nesterov import Nesterov
from moco.optim.rmsprop import RMSProp
from moco.optim.sgd import SGD

__all__ = ["SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam"]
