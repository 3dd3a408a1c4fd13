"""Numbers and names on the `ghostvis` command lines are checked by the parser (`ghostvis_hf.arg_types`): a bad value
exits with argparse's usage error naming the option, before any model loads or benchmark starts."""

import argparse

import pytest

from ghostvis_hf.arg_types import choice_list, non_negative_int, positive_int, positive_int_list, tcp_port
from ghostvis_hf.cli import main as ghostvis


def test_the_types_accept_what_they_say_and_refuse_the_rest():
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and tcp_port("0") == 0 and tcp_port("65535") == 65535
    assert positive_int_list("1,32") == [1, 32] and positive_int_list("8") == [8]
    assert choice_list("a", "b")("b,a") == ["b", "a"]
    for parse, text in [(positive_int, "0"), (positive_int, "-2"), (positive_int, "1.5"), (non_negative_int, "-1"),
                        (tcp_port, "-1"), (tcp_port, "65536"), (positive_int_list, "1,0"), (positive_int_list, ","),
                        (positive_int_list, "1,x"),
                        (choice_list("a", "b"), "a,c"), (choice_list("a"), "")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("argv, message", [
    (["bench", "generate", "--batch-sizes", "1,0"], "argument --batch-sizes: must be >= 1, got 0"),
    (["bench", "generate", "--batch-sizes", "1,x"], "argument --batch-sizes: not an integer: 'x'"),
    (["bench", "generate", "--modes", "fused,fuzed"], "argument --modes: unknown 'fuzed'; choose from fused, graphs"),
    (["bench", "generate", "--new-tokens", "0"], "argument --new-tokens: must be >= 1, got 0"),
    (["bench", "generate", "--ttft-repeats", "0"], "argument --ttft-repeats: must be >= 1, got 0"),
    (["bench", "quantize", "--prompt-len", "-1"], "argument --prompt-len: must be >= 1, got -1"),
    (["bench", "quantize", "--modes", "none,int4"], "argument --modes: unknown 'int4'; choose from none, int8"),
    (["bench", "train", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["bench", "train", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["eval", "--model", "m", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (["eval", "--model", "m", "--batch_size", "0"], "argument --batch_size/--batch-size: must be >= 1, got 0"),
    (["compose", "--text", "t", "--vision", "v", "--out", "o", "--num-image-tokens", "0"],
     "argument --num-image-tokens: must be >= 1, got 0"),
    (["serve", "--model", "m", "--max-seq-len", "0"], "argument --max-seq-len: must be >= 1, got 0"),
    (["serve", "--model", "m", "--port", "70000"], "argument --port: must be <= 65535, got 70000"),
])
def test_a_bad_value_is_a_usage_error_naming_the_option(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the parser refuses first
    with pytest.raises(SystemExit) as exit_:
        ghostvis(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
