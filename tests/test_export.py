"""torch.export of the encoder at a fixed grid and budget: the selector, packing and head are inside the graph."""
import pytest
import torch

from fluxvit.encoders import Encoder
from fluxvit.export import FixedBudgetEncoder, export_encoder
from fluxvit.export import main as export_main
from fluxvit.models import create_model, save_model


def _encoder(num_classes=4):
    torch.manual_seed(0)
    net = create_model("fluxvit_tiny_patch14", depth=2, num_classes=num_classes, head_budgets=(64, 32)).eval()
    return Encoder(net, "stage-3", "pooled", "test", "", "0" * 64)


@pytest.mark.parametrize("budget", [40, None])
def test_exported_program_equals_eager_within_1e5(budget):
    enc = _encoder()
    program = export_encoder(enc, frames=4, resolution=56, budget=budget, batch_size=2)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # new inputs: the selector runs inside the graph, it is not a recorded constant
        x = torch.randn(2, 3, 4, 56, 56, generator=g)
        with torch.no_grad():
            eager = enc.embed(list(x), budget)
            out = program.module()(x)
        assert out.shape == (2, 192 * 2)
        torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    # the head fbe picks is the one embed picks: 40 kept tokens -> head of budget 32
    assert FixedBudgetEncoder(enc, 40, 64).head == 1 and FixedBudgetEncoder(enc, None, 64).head == 0


def test_export_cli_writes_a_loadable_program(tmp_path, capsys):
    enc = _encoder()
    save_model(enc.net, tmp_path / "model.safetensors", metadata={"stage": "finetune"})
    out = export_main(["--model", str(tmp_path / "model.safetensors"), "--frames", "4", "--resolution", "56",
                       "--budget", "32", "--batch-size", "1", "--out", str(tmp_path / "enc.pt2")])
    program = torch.export.load(str(out))
    x = torch.randn(1, 3, 4, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), enc.embed(list(x), 32), rtol=0, atol=1e-5)
    assert "max |exported - eager|" in capsys.readouterr().out


def test_onnx_export_of_the_packed_path_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from fluxvit.export import export_onnx

    enc = _encoder(num_classes=0)
    path = export_onnx(export_encoder(enc, frames=4, resolution=56, budget=40, batch_size=2), tmp_path / "enc.onnx")
    sess = ort.InferenceSession(str(path))
    name = sess.get_inputs()[0].name
    g = torch.Generator().manual_seed(5)
    for _ in range(2):  # the selector (top-k of the token scores) runs inside the ONNX graph too
        x = torch.randn(2, 3, 4, 56, 56, generator=g)
        out = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
        torch.testing.assert_close(out, enc.embed(list(x), 40), rtol=0, atol=1e-5)
