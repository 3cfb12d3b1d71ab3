"""A model's thinking, separated from its answer as the text streams.

Design decisions:
- A model thinks when its output opens with THINK_OPEN (after optional whitespace): what comes
  before THINK_CLOSE is thinking, what follows (leading whitespace dropped) is the answer. These are
  the tags DeepSeek-R1, Qwen3 and foveal's `--think` training data write, and what Ollama's thinking
  parser reads.
- Output that does not open with the tag is all answer, so a model that never thinks is unaffected,
  and a tag later in an answer is left alone.
- Streamed text is held back only while it could still be the beginning of a tag.
- A thought cut off by max_tokens (no closing tag) stays thinking; the answer is then empty.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def partial_tail(text: str, tags) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `tags`: text to hold
    back while streaming (a tag here, a stop string in engine/generate.py)."""
    longest = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:n]):
                longest = n
                break
    return longest


class ThinkingSplitter:
    """push(text) -> (thinking, answer) ready to send; flush() -> what was held back, at the end."""

    def __init__(self):
        self.state = "start"        # start -> thinking -> after -> answer, or start -> answer
        self.buffer = ""

    def push(self, text: str) -> tuple[str, str]:
        self.buffer += text
        thinking = ""
        if self.state == "start":
            head = self.buffer.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.buffer = "thinking", head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head):       # still could become the tag (or is only whitespace)
                return "", ""
            else:
                self.state = "answer"
        if self.state == "thinking":
            end = self.buffer.find(THINK_CLOSE)
            if end < 0:
                keep = partial_tail(self.buffer, (THINK_CLOSE,))
                thinking, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return thinking, ""
            thinking, self.buffer, self.state = self.buffer[:end], self.buffer[end + len(THINK_CLOSE):], "after"
        if self.state == "after":
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return thinking, ""
            self.state = "answer"
        answer, self.buffer = self.buffer, ""
        return thinking, answer

    def flush(self) -> tuple[str, str]:
        rest, self.buffer = self.buffer, ""
        return (rest, "") if self.state == "thinking" else ("", rest)     # "after" holds nothing back


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a whole output."""
    splitter = ThinkingSplitter()
    thinking, answer = splitter.push(text)
    more_thinking, more_answer = splitter.flush()
    return thinking + more_thinking, answer + more_answer


def with_thought(content: str, thinking: str | None) -> str:
    """An earlier assistant turn as the model wrote it: its thought (kept by `foveal chat`, or sent back by a
    client in Ollama's `thinking` / OpenAI-style `reasoning_content`) in front of its answer."""
    return f"{THINK_OPEN}{thinking}{THINK_CLOSE}{content}" if thinking else content
