"""pykernels.ops.custom.call: eager calls on plain tensors run the op's body (no
dispatcher cost), anything traced goes through the registered torch.ops op."""
import torch

from pykernels.ops.custom import call


def _recorder(name, seen):
    def fn(*args):
        seen.append(name)
        return args
    return fn


def test_plain_eager_tensors_run_the_body():
    seen = []
    call(_recorder("op", seen), _recorder("body", seen), torch.zeros(2), 3, "auto")
    assert seen == ["body"]


def test_autograd_and_fake_tensors_go_through_the_op():
    seen = []
    call(_recorder("op", seen), _recorder("body", seen), torch.zeros(2, requires_grad=True))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.zeros(2))
        call(_recorder("op", seen), _recorder("body", seen), fake)
    assert seen == ["op", "op"]


def test_compiled_callers_keep_the_op_in_the_graph():
    # torch.compile traces the public function: the custom op (with its fake impl) is what
    # the graph holds, and the compiled call gives the eager answer.
    import pykernels
    x = torch.randn(4, 256)

    def f(x):
        return pykernels.per_token_cast_to_fp8(x, backend="reference")

    q, s = torch.compile(f, backend="eager", fullgraph=True)(x)
    q0, s0 = f(x)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
