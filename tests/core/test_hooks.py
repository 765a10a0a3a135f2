import pytest
import torch
from torch import nn

from diffbias_core.base.hooks import capture_outputs, edit_outputs, get_module

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only contend


class _Pair(nn.Module):
    def forward(self, x):
        return x * 2, x + 1


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.pair = _Pair()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.inner(x)
        a, b = self.pair(h)
        return self.head(a + b)


def _net():
    torch.manual_seed(0)
    return _Net()


def test_capture_records_every_call_and_removes_the_hook():
    net, x = _net(), torch.randn(3, 4)
    with capture_outputs(net, "inner") as cap:
        net(x)
        net(x[:2])
    assert [o.shape for o in cap.outputs] == [(3, 4), (2, 4)]
    torch.testing.assert_close(cap.stacked()[:3], net.inner(x))
    assert not net.inner._forward_hooks
    streamed = []
    with capture_outputs(net, "pair", output_index=1, callback=streamed.append):
        net(x)
    torch.testing.assert_close(streamed[0], net.inner(x) + 1)


def test_edit_replaces_the_output_and_is_removed_even_after_an_error():
    net, x = _net(), torch.randn(3, 4)
    with torch.no_grad():
        reference = net.head(2 * (net.inner(x) * 0) + 1)  # (0 * 2) + (0 + 1)
        with edit_outputs(net, "inner", torch.zeros_like):
            torch.testing.assert_close(net(x), reference)
        torch.testing.assert_close(net(x), net.head(3 * net.inner(x) + 1))
        with edit_outputs(net, "pair", lambda a: a * 0, output_index=0):
            torch.testing.assert_close(net(x), net.head(net.inner(x) + 1))
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(3, 4\)"):
        with edit_outputs(net, "inner", lambda h: h[:, :2]):
            net(x)
    assert not net.inner._forward_hooks


def test_identity_edit_runs_on_the_chosen_output_and_is_exact():
    """An edit that returns a copy of what it is given: called once per forward with the chosen element of
    the module's output, and the model's output is bit-identical to the unhooked one."""
    net, x = _net(), torch.randn(5, 4)
    reference = net(x)
    seen = []

    def copy(h):
        seen.append(h.detach().clone())
        return h.clone()

    with edit_outputs(net, "pair", copy, output_index=1):
        edited = net(x)
        net(x[:2])
    assert [h.shape for h in seen] == [(5, 4), (2, 4)]
    assert torch.equal(seen[0], net.inner(x) + 1)  # the second element of (x * 2, x + 1)
    assert torch.equal(edited, reference)
    assert not net.pair._forward_hooks


def test_bad_names_and_outputs():
    net = _net()
    with pytest.raises(KeyError, match="no sub-module 'middle'.*inner"):
        get_module(net, "middle")
    with pytest.raises(TypeError, match="output_index 5"):
        with capture_outputs(net, "pair", output_index=5):
            net(torch.randn(1, 4))
    with pytest.raises(ValueError, match="nothing was captured"):
        with capture_outputs(net, "inner") as cap:
            pass
        cap.stacked()
