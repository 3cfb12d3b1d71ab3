"""The thinking splitter: a model's thought kept out of its answer, streamed or whole."""

import pytest

from foveal.engine.thinking import ThinkingSplitter, split_thinking

CASES = [
    ("<think>a red circle</think>red", ("a red circle", "red")),
    ("  <think>a red circle</think>\n red", ("a red circle", "red")),
    ("red", ("", "red")),
    ("", ("", "")),
    ("the tag <think>x</think> in an answer", ("", "the tag <think>x</think> in an answer")),
    ("<thin", ("", "<thin")),                               # ends before the tag is complete: an answer
    ("<think>cut off by max_tokens", ("cut off by max_tokens", "")),
    ("<think>almost closed</thi", ("almost closed</thi", "")),
    ("<think></think>", ("", "")),
    ("<think>a</think>b</think>", ("a", "b</think>")),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_split_whole(text, expected):
    assert split_thinking(text) == expected


@pytest.mark.parametrize("text,expected", CASES)
def test_split_streamed_one_character_at_a_time_gives_the_same(text, expected):
    splitter, thinking, answer = ThinkingSplitter(), "", ""
    for ch in text:
        t, a = splitter.push(ch)
        thinking, answer = thinking + t, answer + a
    t, a = splitter.flush()
    assert (thinking + t, answer + a) == expected


def test_streamed_text_is_held_back_only_while_it_could_be_a_tag():
    splitter = ThinkingSplitter()
    assert splitter.push("<thi") == ("", "")
    assert splitter.push("nk>a blue") == ("a blue", "")
    assert splitter.push(" square</") == (" square", "")      # "</" could open the closing tag
    assert splitter.push("b") == ("</b", "")
    assert splitter.push("</think>") == ("", "")
    assert splitter.push(" ") == ("", "")                    # whitespace after the thought is dropped
    assert splitter.push("blue") == ("", "blue")
    assert splitter.push(" and more") == ("", " and more")
    assert splitter.flush() == ("", "")
    plain = ThinkingSplitter()
    assert plain.push("3") == ("", "3")                       # no tag: answered at once
