import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.metrics import accuracy_score, f1_score, jaccard_score, precision_score, recall_score

from utils import best_threshold, confusion, cpu_bf16_native, cpu_flags, rle_decode, rle_encode, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((40, 30)) < 0.2
    pred = rng.random((40, 30)) < 0.25
    fov = rng.random((40, 30)) < 0.8
    s = scores(*confusion(pred, truth, fov))
    y, p = truth[fov], pred[fov]
    assert s["f1"] == pytest.approx(f1_score(y, p))
    assert s["jaccard"] == pytest.approx(jaccard_score(y, p))
    assert s["recall"] == pytest.approx(recall_score(y, p))
    assert s["precision"] == pytest.approx(precision_score(y, p))
    assert s["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert s["specificity"] == pytest.approx(recall_score(~y, ~p))


def test_confusion_counts_only_fov():
    pred = np.array([[1, 1], [0, 0]], bool)
    truth = np.array([[1, 0], [1, 0]], bool)
    assert confusion(pred, truth) == (1, 1, 1, 1)
    assert confusion(pred, truth, np.array([[1, 0], [0, 0]], bool)) == (1, 0, 0, 0)


def test_empty_prediction_scores_zero_not_nan():
    s = scores(*confusion(np.zeros((4, 4), bool), np.zeros((4, 4), bool)))
    assert s["f1"] == 0.0 and s["accuracy"] == 1.0


def test_best_threshold_matches_brute_force():
    rng = np.random.default_rng(3)
    truth = rng.random(5000) < 0.3
    probs = np.clip(truth * 0.3 + rng.random(5000) * 0.7, 0, 1)
    k, f1 = best_threshold(probs, truth)
    brute = max(scores(*confusion(probs >= (t - 0.5) / 255, truth))["f1"] for t in range(256))
    assert f1 == pytest.approx(brute)
    assert f1 == pytest.approx(scores(*confusion(probs >= k, truth))["f1"])


masks = st.tuples(st.integers(1, 40), st.integers(1, 40)).flatmap(
    lambda hw: arrays(bool, hw, elements=st.booleans()))


@settings(max_examples=200, deadline=None)
@given(masks)
def test_rle_round_trip(mask):
    assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)


@pytest.mark.parametrize("mask", [np.zeros((3, 5), bool), np.ones((7, 1), bool), np.ones((565, 584), bool)])
def test_rle_empty_full_odd(mask):
    runs = rle_encode(mask)
    assert runs == ("" if not mask.any() else f"1 {mask.size}")
    assert np.array_equal(rle_decode(runs, mask.shape), mask)


def test_rle_convention_row_major_one_based():
    mask = np.array([[0, 1, 1], [1, 0, 0]], bool)
    assert rle_encode(mask) == "2 3"
    with pytest.raises(ValueError, match="outside"):
        rle_decode("5 9", (2, 3))


def test_prob_encoding_round_trip_and_ranking():
    from sklearn.metrics import roc_auc_score
    from utils import decode_probs, encode_probs
    p = np.linspace(0, 1, 10001)
    v = encode_probs(p)
    assert v.dtype == np.uint8 and v[0] == 0 and v[-1] == 255
    assert np.all(np.diff(v.astype(int)) >= 0)  # monotone: the ranking is kept
    assert np.abs(decode_probs(v) - p).max() < 2 * (1 / 255)
    assert encode_probs(np.array([1e-4]))[0] >= 2  # small probabilities stay apart from 0
    # most pixels near 0, as in a vessel map: the 8-bit AUC stays close to the float AUC,
    # much closer than a linear 255 * p map
    rng = np.random.default_rng(0)
    y = rng.random(20000) < 0.1
    probs = np.where(y, rng.beta(2, 1, y.size), rng.beta(1, 2, y.size)) ** 6
    exact = roc_auc_score(y, probs)
    assert abs(roc_auc_score(y, encode_probs(probs)) - exact) < 1e-3
    assert abs(roc_auc_score(y, np.round(probs * 255)) - exact) > 2e-3


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "avx512f", "avx512_vnni"}
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(str(info)) == {"fp", "asimd", "bf16"}
    assert cpu_flags(str(tmp_path / "absent")) is None


def test_bf16_is_native_only_with_its_instructions():
    assert not cpu_bf16_native(False, {"avx512f", "avx512_bf16"})  # oneDNN says no: no
    assert not cpu_bf16_native(True, {"avx2", "avx512f", "avx512_vnni"})  # Cascade Lake: emulated
    assert cpu_bf16_native(True, {"avx2", "avx512f", "avx512_bf16"})  # Zen 4, Cooper Lake
    assert cpu_bf16_native(True, {"avx512f", "amx_bf16", "amx_tile"})  # Sapphire Rapids
    assert cpu_bf16_native(True, {"fp", "asimd", "bf16"})  # Arm: oneDNN decides
    assert cpu_bf16_native(True, None)  # no /proc/cpuinfo: oneDNN decides
