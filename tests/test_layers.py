"""layers.capture: the one `with` block of forward hooks (EK-FAC, --knn, the output-layer Hessian)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influence_cli.errors import ConfigError
from influence_cli.layers import capture


class InPlace(nn.Module):
    """A Linear whose input and output are both changed in place after it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x):
        h = x.clone()
        out = self.lin(h)
        h.mul_(0.0)  # in place on the layer's input after it ran
        return out.relu_()  # in place on its output


def test_records_input_and_differentiable_output_and_removes_hooks():
    model = InPlace().requires_grad_(False)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with capture({"lin": model.lin}) as seen:
        loss = model(x).square().sum()
        record = seen.single("lin")
        (g,) = torch.autograd.grad(loss, record.output)
    torch.testing.assert_close(record.input, x)  # a copy: the in-place mul_ did not reach it
    pre = x @ model.lin.weight.T + model.lin.bias
    torch.testing.assert_close(record.output.detach(), pre)  # relu_ downstream did not overwrite it
    torch.testing.assert_close(g, 2 * pre.clamp_min(0))  # dL/d(output) through the relu
    assert not model.lin._forward_hooks


def test_a_layer_run_twice_is_named_and_hooks_go_even_on_error():
    lin = nn.Linear(2, 2).double()
    with pytest.raises(ConfigError, match=r"--knn: layer twice ran 2 times") as err:
        with capture({"twice": lin}, context="--knn: ", hint="use cosine") as seen:
            lin(lin(torch.ones(1, 2, dtype=torch.float64)))
            seen.single("twice")
    assert err.value.hint == "use cosine"
    assert not lin._forward_hooks
    with capture({"a": lin, "b": nn.Linear(2, 2)}) as seen, torch.no_grad():
        lin(torch.ones(1, 2, dtype=torch.float64))
        assert seen.missing() == ["b"] and not seen.single("a").output.requires_grad
        seen.clear()
        assert seen.missing() == ["a", "b"]
