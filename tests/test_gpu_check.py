"""``benchmarks/gpu_check.py --cpu --tiny`` runs every section end to end (so the GPU script cannot rot)."""
import json

from benchmarks import gpu_check


def test_gpu_check_cpu_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--cpu", "--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["table"] == json.loads(json.dumps(report["table"]))
    assert report["backends"]["segments"]["status"] == "ok"
    tiny = report["train"]["fluxvit_tiny_patch14"]
    for case in ("flux_multi_packed", "flux_multi_three_passes", "single_32", "mixed_packed", "mixed_padded"):
        assert tiny[case]["step_s"] > 0 and tiny[case]["tokens_s"] > 0
    assert tiny["packed_over_three"] > 0 and tiny["padded_over_packed"] > 0
    teacher = report["teacher"]
    assert teacher["status"] == "ok" and teacher["clips_s"] > 0 and 0 < teacher["share_of_stage1_step"] < 1
    printed = capsys.readouterr().out
    assert "| check | result | target | status |" in printed and "Flux-Multi packed / three passes" in printed


def test_paper_flop_convention():
    """The paper's FLOP convention reproduces the paper's GFLOPs table within 3 % (the paper's figures run
    1-2 % higher, presumably counting the patch embedding and head too)."""
    paper = {(768, 3072): 440, (768, 2048): 255, (768, 1024): 108, (768, 512): 49,
             (384, 3072): 154, (384, 2048): 83, (384, 1024): 32, (384, 512): 13}
    for (dim, tokens), gmacs in paper.items():
        assert abs(gpu_check.backbone_macs(12, dim, [tokens]) / 1e9 / gmacs - 1) < 0.03, (dim, tokens)
