"""A worked example: one near-dead BatchNorm channel, what folding does to int8 quantization, what to do.

The trained small CNN of ``bnfold.testing`` gets running variance 1e-6 in channel 5 of its last BatchNorm
(``down.1``), as a channel that barely fires during training ends up with. Its scale γ/sqrt(var+eps) is then
about 240 against about 1 for the other channels, so folding multiplies that channel's weights by 240:

    $ python examples/near_dead_channel.py
    bnfold check: BN007 down.1: folded into down.0, per-tensor int8 SQNR 43.7 -> 0.0 dB (43.7 dB lost; ...
    bnfold: SmallCNN
      ...
      quantization: 1 of 4 folded layer(s) flagged (per-tensor int8 loses > 12 dB ...)
        layer | int8 per-tensor dB before -> after | per-channel dB | spread after | largest |scale| channels
        down.0 | 43.7 -> 0.0 | 45.1 | 282 | 5: 241 (γ 0.8, var 1e-06, eps 1e-05), ...

Read it as: quantized per-tensor, the folded ``down.0`` keeps no resolution in its median channel (0 dB:
its weights all round to 0, since the step is set by channel 5's stretched weights), where the unfolded
weights had 43.7 dB; quantized per-channel it keeps 45.1 dB. What to do, in order of preference:

1. quantize that layer per-channel (most toolchains' default for Conv weights; check that yours is not
   configured per-tensor);
2. or re-estimate the BatchNorm statistics on more data (a variance of 1e-6 is usually a dead channel,
   which can also be pruned);
3. or keep that BatchNorm unfolded.

The check measures the fold on the layer's weights, as the report does, since it has the example inputs to
find the pairs with (``--input-shape`` on the command line); without them it estimates from the statistics
alone (max/median of γ/sqrt(var+eps): 49.1 dB here). ``bnfold check`` warns before any folding (BN007), so a
CI gate can catch it; ``bnfold MODEL -o OUT --quantization`` (or ``--target-dtype float16``, which also
compares the folded layer's float16 error with the unfolded one's) reports the measured figures for every fold.
"""

from __future__ import annotations

import torch

import bnfold
from bnfold.testing import example_input, trained_fixture

NEAR_DEAD_CHANNEL = 5


def near_dead_model() -> torch.nn.Module:
    model = trained_fixture("small_cnn")
    with torch.no_grad():
        model.down[1].running_var[NEAR_DEAD_CHANNEL] = 1e-6
    return model


def main() -> None:
    model, inputs = near_dead_model(), example_input("small_cnn")
    for finding in bnfold.check(model, (inputs,)):
        print(f"bnfold check: {finding.code} {finding.describe(with_hint=False)}")
    result = bnfold.fold(model, inputs, quantization=True)
    print(result.report.format_text())


if __name__ == "__main__":
    main()
