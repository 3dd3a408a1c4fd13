import math
import pickle
import time

import pytest

from ghostvis_hf.rewards import (
    anls,
    REWARD_FUNCS,
    completion_text,
    exact_match,
    format_reward,
    get_format_reward,
    get_length_penalty,
    get_reward_funcs,
    length_penalty,
    normalize_vqa_answer,
    relaxed_accuracy,
    tagged_format_reward,
    vqa_accuracy,
    vqa_soft_accuracy,
)
from ghostvis_hf.rewards.relaxed_accuracy import relaxed_match


REFERENCE_REWARDS = [vqa_accuracy, exact_match, relaxed_accuracy, anls]
ALL_REWARDS = list(REWARD_FUNCS.values())


def conversational(text):
    return [{"role": "assistant", "content": text}]


def text_parts(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


# ---------------------------------------------------------------- completion shapes


def test_completion_text_shapes():
    assert completion_text("a b") == "a b"
    assert completion_text(conversational("a b")) == "a b"
    assert completion_text(text_parts("a b")) == "a b"
    image_then_text = [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    assert completion_text(image_then_text) == "x"
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    assert completion_text(None) == ""


@pytest.mark.parametrize("name", sorted(REWARD_FUNCS))
def test_plain_and_conversational_agree(name):
    func = REWARD_FUNCS[name]
    texts = ["two", "The dog.", "12.4%", "I think <answer>2</answer>", "a b c d e f g h", "", "yes\nno"]
    answers = [["2"] * 10, ["dog"], ["12"], ["2"], ["a"], ["x"], ["yes"]]
    plain = func(texts, answers=answers)
    assert plain == func([conversational(t) for t in texts], answers=answers)
    assert plain == func([text_parts(t) for t in texts], answers=answers)


# ---------------------------------------------------------------- VQA accuracy


def test_vqa_normalisation():
    assert normalize_vqa_answer("two") == normalize_vqa_answer("2") == "2"
    assert normalize_vqa_answer("the dog.") == normalize_vqa_answer("dog") == "dog"
    assert normalize_vqa_answer("Dont") == "don't"
    assert normalize_vqa_answer("3.5") == "3.5"  # period before a digit stays
    assert normalize_vqa_answer("1,000") == "1000"  # comma between digits: punctuation deleted
    assert normalize_vqa_answer("red,white") == "red white"  # otherwise a mark not touching a space -> space
    assert normalize_vqa_answer("red, white") == "red white"  # touching a space -> deleted
    assert normalize_vqa_answer("  An   apple\n") == "apple"
    assert normalize_vqa_answer("none") == "0"


@pytest.mark.parametrize(
    "n_match, expected",
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets see 1 match (1/3), the one without it sees 0
        (2, 0.6),  # 8 subsets see 2 (2/3), 2 subsets see 1 (1/3): (16/3 + 2/3) / 10
        (3, 0.9),  # 7 subsets see 3 (1), 3 subsets see 2 (2/3): (7 + 2) / 10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_soft_accuracy_known_values(n_match, expected):
    answers = ["2"] * n_match + ["3"] * (10 - n_match)
    assert vqa_soft_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_soft_accuracy_fewer_than_ten_answers():
    # 2 of 3: each matching subset sees 1 (1/3), the other sees 2 (2/3)
    assert vqa_soft_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_vqa_accuracy_falls_back_to_exact_match_below_three_answers(caplog):
    # Leave-one-out over one reference was always 0 (nobody else agrees), over two at most 1/3: a single-answer data
    # set scored 0.0 for a model that is right on every row.
    from ghostvis_hf.rewards import vqa_normalize

    vqa_normalize._warn_few_answers.cache_clear()
    with caplog.at_level("WARNING", logger="ghostvis_hf.rewards.vqa_normalize"):
        assert vqa_soft_accuracy("cat", ["cat"]) == 1.0
        assert vqa_soft_accuracy("Cat.", "cat") == 1.0
        assert vqa_soft_accuracy("two", ["2", "3"]) == 1.0
        assert vqa_soft_accuracy("dog", ["cat", "cat"]) == 0.0
        assert vqa_accuracy(["The dog.", "two", "no"], answers=[["dog"], "2", ["yes", "yes"]]) == [1.0, 1.0, 0.0]
    warnings = [r for r in caplog.records if "fewer than 3 reference answers" in r.getMessage()]
    assert len(warnings) == 1  # once per process, however many rows


def test_vqa_accuracy_reward():
    answers = [["2"] * 3 + ["3"] * 7, ["yes"] * 10, ["dog"] * 10]
    got = vqa_accuracy(["Two", "no", "It is <answer>the dog.</answer>"], answers=answers)
    assert got == pytest.approx([0.9, 0.0, 1.0])


# ---------------------------------------------------------------- exact match, relaxed accuracy, ANLS


def test_relaxed_accuracy_ignores_a_trailing_period_on_both_sides():
    # a sentence answer identical to its reference scored 0: only the prediction's period was dropped
    assert relaxed_accuracy(["It is blue.", "It is blue", "3."], answers=[["It is blue."], ["It is blue."], ["3"]]) == [
        1.0, 1.0, 1.0]


def test_anls_known_values():
    from ghostvis_hf.rewards.anls import anls_score, levenshtein

    assert levenshtein("", "abc") == 3 and levenshtein("flaw", "lawn") == 2
    assert anls_score("  CALIFORNIA ", ["california"]) == 1.0  # case and surrounding whitespace ignored
    assert anls_score("californa", ["California"]) == pytest.approx(0.9)
    assert anls_score("abcde", ["abxyz"]) == 0.0  # distance 3/5 >= 0.5: no credit
    assert anls_score("abcd", ["abxy", "abcx"]) == pytest.approx(0.75)  # best reference counts
    assert anls(["x" * 100_000], answers=[["x"]]) == [0.0]  # long completion: capped, not quadratic


def test_exact_match():
    answers = [["dog"], ["dog"], "A cat", ["x", "Yes"]]
    assert exact_match(["the dog.", "dogs", "cat!", "yes"], answers=answers) == [1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "pred, target, ok",
    [
        ("104", "100", True),
        ("105", "100", True),
        ("106", "100", False),
        ("1,040", "1000", True),
        ("1,000.5", "1000", True),
        ("50%", "50", True),
        ("50%", "0.5", True),
        ("50", "50%", True),
        ("12.", "12", True),
        ("0", "0", True),
        ("0.0", "0", True),
        ("0.001", "0", False),  # zero target: no tolerance
        ("Blue", "blue", True),
        ("blue", "dark blue", False),
        ("nan", "nan", True),  # not a number here, so compared as strings
        ("inf", "5", False),
    ],
)
def test_relaxed_match(pred, target, ok):
    assert relaxed_match(pred, target) is ok


def test_relaxed_accuracy_max_over_references():
    assert relaxed_accuracy(["7", "7"], answers=[["9", "7.2"], ["9"]]) == [1.0, 0.0]


# ---------------------------------------------------------------- format, length


def test_format_reward_short():
    completions = ["two dogs", "one two three four five", "one two three four five six", "two\ndogs", "  2 \n"]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert get_format_reward("short", max_words=1)(["2", "2 dogs"]) == [1.0, 0.0]


def test_format_reward_tagged():
    completions = [
        "<answer>2</answer>",
        "Let me count.\nThere are two. <answer>2</answer>",
        "<answer>2</answer> and <answer>3</answer>",
        "<answer></answer>",
        "<answer>2",
        "</answer>2<answer>",
        "2",
    ]
    assert tagged_format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert get_format_reward("tagged", max_words=1)(["<answer>2 dogs</answer>"]) == [0.0]


def test_length_penalty():
    penalty = get_length_penalty(budget=4, unit="words")
    lengths = [0, 4, 5, 10, 16, 100]
    got = penalty([" ".join(["w"] * n) for n in lengths])
    assert got == pytest.approx([0.0, 0.0, -1 / 12, -0.5, -1.0, -1.0])
    assert all(math.copysign(1.0, r) == 1.0 for r in got if r == 0)  # 0.0, not -0.0
    assert get_length_penalty(budget=10, unit="chars")(["x" * 40]) == [-1.0]


def test_factory_validation():
    with pytest.raises(ValueError, match="short, tagged"):
        get_format_reward("json")
    with pytest.raises(ValueError, match="words, chars"):
        get_length_penalty(unit="tokens")


def test_factory_rewards_are_picklable_and_named():
    for func in (format_reward, tagged_format_reward, length_penalty):
        clone = pickle.loads(pickle.dumps(func))
        assert clone(["two dogs"]) == func(["two dogs"])
    assert [f.__name__ for f in ALL_REWARDS] == [
        "vqa_accuracy",
        "exact_match",
        "relaxed_accuracy",
        "anls",
        "format_reward",
        "tagged_format_reward",
        "length_penalty",
    ]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("func", ALL_REWARDS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_and_whitespace_completion(func, text):
    expected = 0.0
    assert func([text, conversational(text)], answers=[[""], [" "]]) == [expected, expected]


@pytest.mark.parametrize("func", ALL_REWARDS, ids=lambda f: f.__name__)
def test_enormous_completion_is_fast_and_finite(func):
    huge = ["2, " * 350_000, "(" * 1_000_000, "<answer>" * 100_000 + "1" * 200_000, "1,000" * 200_000]
    start = time.perf_counter()
    got = func(huge + [conversational(h) for h in huge], answers=[["2"] * 10] * (2 * len(huge)))
    assert time.perf_counter() - start < 2.0
    assert all(isinstance(r, float) and math.isfinite(r) for r in got)
    if func is length_penalty:
        assert got[0] == got[4] == -1.0  # 350k words; "(" * 1M is one word, unit="chars" would catch it


@pytest.mark.parametrize("func", REFERENCE_REWARDS, ids=lambda f: f.__name__)
def test_missing_answers_column(func):
    with pytest.raises(ValueError, match="needs an 'answers' column"):
        func(["2"])
    with pytest.raises(ValueError, match="needs an 'answers' column"):
        func(["2"], solution=["2"])


@pytest.mark.parametrize("func", REFERENCE_REWARDS, ids=lambda f: f.__name__)
def test_answers_length_mismatch(func):
    with pytest.raises(ValueError, match="aligned"):
        func(["2", "3"], answers=[["2"]])
    with pytest.raises(ValueError, match="aligned"):
        func(["2"], answers="2")  # a bare string column is a mistake, not one answer per character


@pytest.mark.parametrize("func", REFERENCE_REWARDS, ids=lambda f: f.__name__)
def test_none_and_empty_references_score_zero(func):
    got = func(["2", "2", "2", "2"], answers=[None, [], [None], ["2"] * 10])
    assert got[:3] == [0.0, 0.0, 0.0]
    assert got[3] == 1.0


@pytest.mark.parametrize("func", REFERENCE_REWARDS, ids=lambda f: f.__name__)
def test_single_string_reference_per_sample(func):
    assert func(["dog", "cat"], answers=["dog", "dog"])[1] == 0.0


def test_rewards_ignore_extra_kwargs():
    extra = {"prompts": ["q"], "completion_ids": [[1, 2]], "trainer_state": None, "log_extra": None, "image": [None]}
    for func in ALL_REWARDS:
        assert len(func(["2"], answers=[["2"]], **extra)) == 1


# ---------------------------------------------------------------- registry


def test_registry_names():
    names = {"vqa_accuracy", "exact_match", "relaxed_accuracy", "anls", "format", "tagged_format", "length_penalty"}
    assert set(REWARD_FUNCS) == names
    assert get_reward_funcs(["format", "vqa_accuracy"]) == [format_reward, vqa_accuracy]


def test_registry_unknown_name():
    with pytest.raises(ValueError) as excinfo:
        get_reward_funcs(["vqa_accuracy", "bleu"])
    message = str(excinfo.value)
    assert "'bleu'" in message
    for name in REWARD_FUNCS:
        assert name in message


def test_registry_builds_factories_with_reward_kwargs():
    from ghostvis_hf.rewards import REWARD_FACTORIES

    assert set(REWARD_FACTORIES) <= set(REWARD_FUNCS)
    for name, factory in REWARD_FACTORIES.items():  # the defaults are what the factory builds without arguments
        assert repr(factory()) == repr(REWARD_FUNCS[name])
    fmt, penalty = get_reward_funcs(["format", "length_penalty"],
                                    {"format": {"max_words": 1}, "length_penalty": {"budget": 2, "unit": "chars"}})
    assert fmt(["two dogs"]) == [0.0] and format_reward(["two dogs"]) == [1.0]
    assert penalty(["abcdefgh"]) == [-1.0] and penalty.__name__ == "length_penalty"


@pytest.mark.parametrize(
    "names,kwargs,match",
    [
        (["length_penalty"], {"length_penalty": {"max_length": 64}},
         r"\['max_length'\] for reward 'length_penalty'; allowed: budget, unit"),
        (["format"], {"format": {"mode": "tagged"}}, "allowed: max_words"),
        (["exact_match"], {"exact_match": {"strict": True}}, "'exact_match' takes no arguments; configurable: format"),
        (["format"], {"length_penalty": {"budget": 4}}, "configures \\['length_penalty'\\], which reward_funcs"),
        (["format"], {"lenght_penalty": {"budget": 4}}, "Unknown reward function 'lenght_penalty'"),
        (["length_penalty"], {"length_penalty": {"budget": 0}}, "budget must be a positive integer"),
    ],
)
def test_registry_refuses_bad_reward_kwargs(names, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_reward_funcs(names, kwargs)
