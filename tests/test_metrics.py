"""Metrics on hand-built inputs: retrieval (ties, several captions per video), multi-view, top-k, GFLOPs."""
import pytest
import torch

from fluxvit.metrics import (aggregate_views, chance_recall, dual_softmax, fluxvit_gflops, retrieval_metrics,
                             retrieval_protocol, topk_accuracy)


def test_perfect_and_reversed_retrieval():
    eye = torch.eye(4)
    m = retrieval_metrics(eye, [0, 1, 2, 3])
    assert m["t2v_r1"] == m["v2t_r1"] == 100.0 and m["t2v_medr"] == m["v2t_meanr"] == 1.0
    # every text scores its own video lowest: rank 4 of 4
    m = retrieval_metrics(-eye, [0, 1, 2, 3])
    assert m["t2v_r1"] == 0.0 and m["t2v_r5"] == 100.0 and m["t2v_meanr"] == 4.0 and m["v2t_medr"] == 4.0


def test_hand_computed_ranks():
    sim = torch.tensor([
        [0.9, 0.1, 0.5],   # text 0 -> video 0: rank 1
        [0.8, 0.7, 0.1],   # text 1 -> video 1: rank 2
        [0.6, 0.9, 0.3],   # text 2 -> video 2: rank 3
    ])
    m = retrieval_metrics(sim, [0, 1, 2])
    assert m["t2v_r1"] == pytest.approx(100 / 3) and m["t2v_medr"] == 2 and m["t2v_meanr"] == 2
    # columns: video 0 ranks text 0 first (0.9); video 1 ranks text 2 (0.9) above text 1 (0.7): rank 2;
    # video 2 ranks text 0 (0.5) above text 2 (0.3): rank 2 (text 1 scores 0.1)
    assert m["v2t_r1"] == pytest.approx(100 / 3) and m["v2t_meanr"] == pytest.approx(5 / 3)


def test_ties_count_against_the_positive():
    m = retrieval_metrics(torch.zeros(3, 3), [0, 1, 2])
    assert m["t2v_r1"] == 0.0 and m["t2v_meanr"] == 3.0 and m["v2t_meanr"] == 3.0


def test_several_captions_per_video_v2t_uses_best_text():
    # videos 0 and 1; texts 0, 1 describe video 0, text 2 describes video 1
    sim = torch.tensor([
        [0.2, 0.9],   # text 0 (video 0) prefers video 1
        [0.8, 0.1],   # text 1 (video 0)
        [0.3, 0.7],   # text 2 (video 1)
    ])
    m = retrieval_metrics(sim, [0, 0, 1])
    assert m["t2v_r1"] == pytest.approx(200 / 3)  # texts 1 and 2 rank their video first
    # video 0 column: text1 0.8 best positive, no negative above -> rank 1
    # video 1 column: text0 (negative) 0.9 > text2 0.7 -> rank 2
    assert m["v2t_r1"] == 50.0 and m["v2t_meanr"] == 1.5 and m["v2t_medr"] == 1.5


def test_dual_softmax_one_prior_per_direction_hand_built():
    # texts are rows, videos columns; text i describes video i.
    sim = torch.tensor([[0.8, 0.9, 0.6],
                        [0.0, 0.8, 0.0],
                        [0.0, 0.1, 0.5]])
    plain = retrieval_metrics(sim, [0, 1, 2])
    # T2V: text 0 prefers video 1 (0.9 > 0.8); V2T: video 1 prefers text 0 (0.9 > 0.8), video 2 text 0 (0.6 > 0.5)
    assert plain["t2v_r1"] == pytest.approx(200 / 3) and plain["v2t_r1"] == pytest.approx(100 / 3)
    e = torch.exp
    # T2V prior: softmax over the texts of each video (column). Text 0 on video 0: 0.8 * e^.8 / (e^.8 + 2) = 0.421;
    # on video 1: 0.9 * e^.9 / (e^.9 + e^.8 + e^.1) = 0.382 -> video 0 now ranks first.
    t2v_00 = 0.8 * e(torch.tensor(0.8)) / (e(torch.tensor(0.8)) + 2)
    t2v_01 = 0.9 * e(torch.tensor(0.9)) / (e(torch.tensor(0.9)) + e(torch.tensor(0.8)) + e(torch.tensor(0.1)))
    # V2T prior: softmax over the videos of each text (row). Video 1: text 1 scores 0.8 * e^.8 / (e^.8 + 2) = 0.421,
    # text 0 scores 0.9 * e^.9 / (e^.8 + e^.9 + e^.6) = 0.340; video 2: text 2 0.5 * e^.5 / (1 + e^.1 + e^.5) = 0.220,
    # text 0 0.6 * e^.6 / (e^.8 + e^.9 + e^.6) = 0.168 -> every video ranks its own text first.
    v2t_11 = 0.8 * e(torch.tensor(0.8)) / (e(torch.tensor(0.8)) + 2)
    v2t_01 = 0.9 * e(torch.tensor(0.9)) / (e(torch.tensor(0.8)) + e(torch.tensor(0.9)) + e(torch.tensor(0.6)))
    t2v, v2t = dual_softmax(sim, temperature=1.0)
    torch.testing.assert_close(t2v[0, :2], torch.stack([t2v_00, t2v_01]))
    torch.testing.assert_close(v2t[:2, 1], torch.stack([v2t_01, v2t_11]))
    assert t2v_00 > t2v_01 and v2t_11 > v2t_01

    dsl = retrieval_metrics(sim, [0, 1, 2], dual_softmax_temperature=1.0)
    assert dsl["t2v_r1"] == 100.0 and dsl["v2t_r1"] == 100.0
    # Reusing the text-side prior for V2T (the old behaviour) leaves video 1 and 2 at rank 2: the direction matters.
    reused = retrieval_metrics(sim * torch.softmax(sim, dim=0), [0, 1, 2])
    assert reused["v2t_r1"] == pytest.approx(100 / 3)
    # A sharper prior (tau -> small) is a different protocol with its own figures; the name says which.
    assert retrieval_protocol(None) == "plain" and retrieval_protocol(1.0) == "DSL tau=1"


def test_retrieval_errors_and_chance():
    sim = torch.tensor([[0.5, 0.1], [0.45, 0.4]])
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(sim, [0])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(sim, [0, 2])
    with pytest.raises(ValueError, match="temperature"):
        retrieval_metrics(sim, [0, 1], dual_softmax_temperature=0.0)
    assert chance_recall(100) == 1.0 and chance_recall(100, 10) == 10.0


def test_aggregate_views_and_topk():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0], [0.0, 5.0, 0.0]])
    probs = aggregate_views(logits, torch.tensor([0, 0, 1, 1]))
    expected0 = (logits[0].softmax(0) + logits[1].softmax(0)) / 2
    torch.testing.assert_close(probs[0], expected0)
    assert probs.argmax(1).tolist() == [2, 1]
    acc = topk_accuracy(probs, torch.tensor([0, 1]), ks=(1, 2))
    assert acc == {"top1": 50.0, "top2": 100.0}


@pytest.mark.parametrize("tokens,paper", [(3072, 440), (2048, 255), (1024, 108), (512, 49)])
def test_gflops_convention_base(tokens, paper):
    # the precision the docstring states: the table's integer rounding, and 1.5 % for the backbone alone
    assert abs(fluxvit_gflops(tokens, 768, 12) - paper) < 0.5
    assert fluxvit_gflops(tokens, 768, 12, with_stem_and_pool=False) == pytest.approx(paper, rel=0.015)


def test_top5_is_left_out_below_six_classes():
    labels = torch.tensor([0, 1, 2] * 9)
    assert set(topk_accuracy(torch.randn(27, 5), labels)) == {"top1"}  # top-5 of 5 classes is 100 % by construction
    six = torch.zeros(27, 6)
    six[torch.arange(23), labels[:23]] = 1.0  # 23 of 27 right
    acc = topk_accuracy(six, labels)
    assert set(acc) == {"top1", "top5"} and acc["top1"] == pytest.approx(100 * 23 / 27)


def test_rounded_reaches_nested_figures():
    from fluxvit.metrics import rounded

    got = rounded({"top1": 85.18518805503845, "rows": [{"r1": 33.333333333333336, "n": 3}], "name": "val"})
    assert got == {"top1": 85.19, "rows": [{"r1": 33.33, "n": 3}], "name": "val"}
