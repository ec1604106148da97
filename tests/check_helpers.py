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
