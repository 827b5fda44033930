"""GPU-shaped packed forward on CPU, for FluxViT and the InternVideo2 teacher: no host reads inside the blocks,
blocks that trace as one graph, regional compilation that matches eager training and does not recompile for a
new grid or a block's drop-path rate, and activation checkpointing that changes memory, not results."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from fluxvit.models import create_model, force_backend, varlen_attention
from fluxvit.models.attention import PackedSeqs
from fluxvit.models.internvideo2 import InternVideo2Block
from fluxvit.models.layers import Block
from host_syncs import SyncCounter

MODELS = {
    "fluxvit": lambda **kw: create_model("fluxvit_tiny_patch14", **{"depth": 2, "num_classes": 5, **kw}),
    "internvideo2": lambda **kw: create_model("internvideo2_1b_patch14", **{
        "embed_dim": 64, "depth": 2, "num_heads": 4, "attn_pool_num_heads": 4, "clip_embed_dim": 32, "img_size": 56,
        "num_frames": 4, **kw}),
}


def _model(name, **kw):
    torch.manual_seed(0)
    return MODELS[name](**kw)


def _clips(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 56, 56, generator=g), torch.randn(3, 2, 112, 112, generator=g),
            torch.randn(3, 4, 56, 56, generator=g)][:n]


def _loss(model, budgets):
    return model(_clips(n=len(budgets)), num_tokens=budgets).float().square().mean()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_host_reads_inside_blocks(name, monkeypatch):
    """A training forward and backward on a mixed pack reads nothing back to the host inside the blocks."""
    counter = SyncCounter()
    for cls in (Block, InternVideo2Block):
        def counted(self, x, pack, drop=None, _forward=cls.forward):
            with counter:
                return _forward(self, x, pack, drop)

        monkeypatch.setattr(cls, "forward", counted)
    model = _model(name, drop_path_rate=0.1).train()
    _loss(model, [None, 40]).backward()
    assert counter.count == 0
    # The counter does see the read that a tensor cu_seqlens costs (the call path without a PackedSeqs).
    q = torch.randn(5, 2, 8)
    with counter:
        varlen_attention(q, q, q, torch.tensor([0, 2, 5]))
    assert counter.count >= 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_trace_as_one_graph(name):
    """torch.compile(fullgraph=True) over every block with the compile-friendly kernel (flex): a graph break
    (a host read, a data-dependent shape) would raise."""
    model = _model(name).eval()
    pack = PackedSeqs([1, 40, 17, 130])
    x = torch.randn(pack.total, model.config.embed_dim)

    def blocks(x, pack):
        for blk in model.blocks:
            x = blk(x, pack)
        return x

    with torch.no_grad(), force_backend("flex"):
        got = torch.compile(blocks, fullgraph=True, backend="eager")(x, pack)
    with torch.no_grad(), force_backend("math"):
        ref = blocks(x, pack)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_blocks_match_eager_training_and_reuse_graphs_for_new_grids(name):
    """Regional compilation (traced through AOT autograd, as inductor sees it) gives the eager loss and
    gradients (same stochastic-depth draws), and a second grid/budget mix, then a batch of three views,
    compile nothing new (the token count is marked dynamic from the first call; the blocks read the view
    count as a size, not as a host int to specialise on)."""
    eager = _model(name, drop_path_rate=0.2).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks(backend="aot_eager")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # names unchanged (no _orig_mod)
    graphs = []
    for budgets in ([None, 40], [30, None], [20, None, 10]):
        _assert_same_training_step(eager, compiled, budgets)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1] == graphs[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_blocks_share_graphs_across_drop_path_rates(name):
    """Stochastic depth gives every block its own rate (a linear ramp); the factors are drawn outside the
    blocks, so the compiled blocks share their graphs: 10 blocks (more than dynamo's recompile limit of 8)
    compile as many graphs as 2, and none falls back to eager."""
    graphs = []
    for depth in (2, 10):
        torch._dynamo.reset()
        counters.clear()
        model = _model(name, depth=depth, drop_path_rate=0.3).train()
        assert len({blk.drop_path for blk in model.blocks}) == depth  # a rate per block
        model.compile_blocks(backend="eager")
        _loss(model, [None, 40]).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_drop_path_drawn_before_the_blocks_equals_drawn_inside(name):
    """``run_blocks`` draws every block's stochastic-depth factors first; the blocks called one by one draw
    their own: the same draws (same order), so the same output and the same generator state after."""
    model = _model(name, depth=3, drop_path_rate=0.5).train()
    pack = PackedSeqs([7, 5, 9, 3])
    x = torch.randn(pack.total, model.config.embed_dim, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    got, _ = model.run_blocks(x, pack)
    after = torch.rand(4)
    torch.manual_seed(11)
    ref = x
    for blk in model.blocks:
        ref = blk(ref, pack)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert torch.equal(torch.rand(4), after)
    # the draws are live: another seed drops other views
    torch.manual_seed(12)
    assert not torch.equal(model.run_blocks(x, pack)[0], got)


def _assert_same_training_step(eager, compiled, budgets):
    """One forward + backward of each model on the same clips and stochastic-depth draws: equal losses, and
    every gradient eager has is present and equal in the compiled model."""
    losses = []
    for m in (eager, compiled):
        m.zero_grad()
        torch.manual_seed(1)
        loss = _loss(m, budgets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    pairs = list(zip(eager.parameters(), compiled.parameters()))
    assert all((a.grad is None) == (b.grad is None) for a, b in pairs)
    grads = [(a.grad, b.grad) for a, b in pairs if a.grad is not None]
    assert grads
    for a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_grad_checkpointing_same_loss_and_grads_and_recomputes(name):
    calls = {"n": 0}
    plain, ckpt = _model(name, drop_path_rate=0.2).train(), _model(name, drop_path_rate=0.2).train()
    ckpt.set_grad_checkpointing()
    ckpt.blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    out = []
    for m in (plain, ckpt):
        torch.manual_seed(3)  # same stochastic-depth draws; checkpointing must replay them in the recompute
        loss = _loss(m, [None, 30])
        loss.backward()
        out.append(loss.detach())
    torch.testing.assert_close(out[0], out[1])
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert calls["n"] == 2  # block 0 ran in the forward and again in the backward
    with torch.no_grad():
        _loss(ckpt, [None, 30])
    assert calls["n"] == 3  # no recompute without a backward


@pytest.mark.parametrize("option", ["compile", "grad_checkpointing"])
def test_fit_applies_model_options(option, monkeypatch):
    """train.compile reaches the student and the frozen teacher; train.grad_checkpointing the student only."""
    from types import SimpleNamespace

    from fluxvit.models import FluxViT, InternVideo2
    from fluxvit.stages.common.config import TrainConfig
    from fluxvit.stages.common.loop import _apply_model_options

    seen = []
    for cls in (FluxViT, InternVideo2):
        monkeypatch.setattr(cls, "compile_blocks", lambda self, **kw: seen.append(type(self).__name__))
    task = SimpleNamespace(model=torch.nn.Sequential(_model("fluxvit")), teacher=_model("internvideo2"))
    _apply_model_options(task, TrainConfig(**{option: True}))
    assert seen == (["FluxViT", "InternVideo2"] if option == "compile" else [])
    assert task.model[0].grad_checkpointing is (option == "grad_checkpointing")
    assert task.teacher.grad_checkpointing is False


def test_inductor_compiled_blocks_match_eager_training():
    """The same agreement with the real compiler (inductor's CPU code generation), FluxViT only to keep the suite
    short: loss equal and gradients within float rounding, on two grid/budget mixes."""
    eager = _model("fluxvit", drop_path_rate=0.2).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()  # torch.compile's default backend: inductor
    for budgets in ([None, 40], [30, None]):
        _assert_same_training_step(eager, compiled, budgets)
