"""Callables for ``bnfold check --factory`` and ``--model`` in test_check.py (imported by module name)."""

from torch import nn

from bnfold.testing import SmallCNN, trained_fixture


def small_cnn_architecture() -> nn.Module:
    """The architecture of the small_cnn fixture, untrained, in eval mode: a state-dict fills it in."""
    return SmallCNN(nn).eval()


def small_cnn_as_built() -> nn.Module:
    """The architecture as a model zoo's factory returns it: in training mode, as every new module is."""
    return SmallCNN(nn)


def trained_small_cnn() -> nn.Module:
    return trained_fixture("small_cnn")


def trained_small_cnn_in_train_mode() -> nn.Module:
    return trained_fixture("small_cnn").train()


def not_a_model() -> int:
    return 42


def exits() -> None:
    """A callable that ends the process, as a script's main() may: bnfold must report it, not exit with it."""
    import sys

    sys.exit(0)


def holds_a_lock() -> nn.Module:
    """A trained model that deepcopy cannot copy (a lock among its attributes)."""
    import threading

    model = trained_fixture("small_cnn")
    model.lock = threading.Lock()
    return model


def lazy_batchnorm() -> nn.Module:
    """A LazyBatchNorm2d never run: its statistics do not exist yet."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d()).eval()
