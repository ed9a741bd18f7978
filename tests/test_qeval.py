"""qeval.py: the ranking statistics of QLEARN §2.7 on examples worked by hand, and against scipy."""
import pytest
from scipy import stats

from chatrlhf.qeval import ScoredSet, bootstrap_capture, capture, kendall_tau, pairwise_accuracy, ranks, \
    set_statistics, spearman


def test_capture_is_the_share_of_the_oracle_gain_and_undefined_without_one():
    assert capture(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert capture(0.2, 0.2, 0.8) == 0.0 and capture(0.8, 0.2, 0.8) == 1.0
    assert capture(0.3, 0.3, 0.3) is None


def test_pairwise_accuracy_counts_pairs_with_different_rewards_and_half_for_q_ties():
    assert pairwise_accuracy([0.1, 0.5, 0.3], [1, 3, 2]) == (3.0, 3)
    # (0,1): Q tie → ½; (0,2) and (1,2): Q says 0 and 1 beat 2, the reward says the opposite
    assert pairwise_accuracy([1, 1, 0], [0, 1, 2]) == (0.5, 3)
    assert pairwise_accuracy([0.3, 0.1], [1, 1]) == (0.0, 0)  # equal rewards: no pair


def test_kendall_tau_b_by_hand_and_as_scipy():
    # one discordant pair of six: (5 − 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # x tied on one pair of three: C = 2, D = 0 → 2 / √((3 − 1)(3 − 0))
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None
    for x, y in (([0.3, 0.1, 0.9, 0.9, 0.2], [1, 0, 2, 1, 1]), ([5, 4, 3, 2, 1, 0], [0, 1, 1, 3, 2, 5])):
        assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)


def test_spearman_with_average_ranks_by_hand_and_as_scipy():
    assert ranks([2, 1, 2]).tolist() == [2.5, 1.0, 2.5]
    # ranks − mean: (−1, 0, 1) and (1, −1, 0): Σ = −1, √(2·2) = 2
    assert spearman([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert spearman([1, 2, 3], [7, 7, 7]) is None
    x, y = [0.3, 0.1, 0.9, 0.9, 0.2], [10, 3, 12, 8, 8]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


SETS = [ScoredSet(q=[0.9, 0.1], reward=[1.0, 0.0], length=[2, 4], group=0),
        ScoredSet(q=[0.2, 0.3, 0.1], reward=[0.0, 0.5, 1.0], length=[1, 2, 3], group=1)]


def test_set_statistics_by_hand():
    got = set_statistics(SETS, seed=0)
    # Q picks reward 1 and 0.5; random: 0.5 and 0.5; oracle: 1 and 1
    assert got["eval/q"] == pytest.approx(0.75) and got["eval/random"] == pytest.approx(0.5)
    assert got["eval/oracle"] == pytest.approx(1.0) and got["eval/capture"] == pytest.approx(0.5)
    assert got["eval/states"] == 2
    assert got["eval/pair_accuracy"] == pytest.approx(2 / 4)  # set 1: 1 of 1; set 2: 1 of 3
    assert got["eval/kendall_tau"] == pytest.approx((1 + -1 / 3) / 2)
    assert got["eval/length_q"] == pytest.approx(2.0) and got["eval/length_random"] == pytest.approx(2.5)
    assert got["eval/spearman_q_length"] == pytest.approx((-1 + -0.5) / 2)
    # two groups: resamples {0,0} → capture 1, {1,1} → 0, mixed → ½; the 2.5 / 97.5 percentiles are 0 and 1
    assert (got["eval/capture_lo"], got["eval/capture_hi"]) == (0.0, 1.0)


def test_the_bootstrap_resamples_groups_is_seeded_and_narrows_with_agreeing_groups():
    assert bootstrap_capture(SETS, seed=3) == bootstrap_capture(SETS, seed=3)
    assert bootstrap_capture(SETS[:1]) is None  # one group: nothing to resample
    same = [ScoredSet([1.0, 0.0, 0.5], [1.0, 0.0, 0.5], [1, 1, 1], group=g) for g in range(6)]
    assert bootstrap_capture(same) == pytest.approx((1.0, 1.0))
    # states of one dialogue move together: two states in group 0 count as one draw
    grouped = [SETS[0], ScoredSet(q=[0.9, 0.1], reward=[1.0, 0.0], length=[2, 4], group=0), SETS[1]]
    lo, hi = bootstrap_capture(grouped, seed=0)
    assert lo == 0.0 and hi == 1.0


def test_undefined_figures_are_left_out_not_nan():
    flat = [ScoredSet(q=[0.1, 0.2], reward=[0.5, 0.5], length=[3, 3], group=0)]
    got = set_statistics(flat)
    assert set(got) == {"eval/q", "eval/random", "eval/oracle", "eval/states", "eval/length_q", "eval/length_random"}
    assert set_statistics([]) == {}
