"""`effine chat` driven through a pseudo-terminal, on a tiny random model with SmolLM2's tokenizer and template."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Terminal:
    """A child process on a pseudo-terminal: type lines, read output up to a marker."""

    def __init__(self, argv: list[str]):
        master, slave = pty.openpty()
        env = dict(os.environ, TERM="dumb", PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.fd, self.buf = master, ""

    def read_until(self, marker: str, timeout: float = 120.0) -> str:
        """Everything up to and including the next ``marker`` (consumed), with the terminal's CRs removed."""
        end = time.monotonic() + timeout
        while marker not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.fd], [], [], 0)[0]:
                raise AssertionError(f"no {marker!r} in the terminal output:\n{self.buf}")
            if select.select([self.fd], [], [], min(left, 1.0))[0]:
                try:
                    self.buf += os.read(self.fd, 65536).decode("utf-8", "replace").replace("\r", "")
                except OSError:  # EIO: the child closed the terminal
                    pass
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def say(self, line: str) -> str:
        """Type a line at the prompt; the text printed before the next prompt."""
        self.type(line + "\n")
        return self.read_until("you> ")[: -len("you> ")]

    def close(self) -> int:
        rc = self.proc.wait(timeout=60)
        os.close(self.fd)
        return rc


@pytest.fixture(scope="module")
def tiny_loaded(tiny_llama_dir):
    from effine.eval.generate import load_for_generation

    return load_for_generation(str(tiny_llama_dir), log=lambda _m: None)


def _reply(loaded, messages, system=None):
    from effine.eval.chat import reply

    return reply(loaded.model, loaded.tokenizer, messages, system_prompt=system, max_new_tokens=8)[0]


def test_reply_streams_while_generating(tiny_loaded):
    """Pieces reach the terminal during generation (before the last forward pass), and add up to the reply."""
    from effine.eval.chat import reply

    model, forwards, pieces = tiny_loaded.model, [0], []
    hook = model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        text, dropped = reply(model, tiny_loaded.tokenizer, [{"role": "user", "content": "hello there"}],
                              max_new_tokens=12, on_text=lambda p: pieces.append((p, forwards[0])))
    finally:
        hook.remove()
    assert dropped == 0 and text
    assert len(pieces) > 1 and pieces[0][1] < forwards[0]
    assert "".join(p for p, _ in pieces).strip() == text


def test_chat_in_a_pseudo_terminal(tiny_llama_dir, tiny_loaded):
    hello = [{"role": "user", "content": "hello"}]
    r1 = _reply(tiny_loaded, hello)
    r2 = _reply(tiny_loaded, [*hello, {"role": "assistant", "content": r1}, {"role": "user", "content": "again"}])
    r3 = _reply(tiny_loaded, hello, system="Answer in French.")
    assert len({r1, r2, r3}) == 3  # history and system prompt change the reply, so the checks below can fail

    term = Terminal([sys.executable, "-m", "effine.cli", "chat", str(tiny_llama_dir), "--max-new-tokens", "8"])
    try:
        assert "/reset" in term.read_until("you> ")
        assert term.say("hello").strip() == f"hello\nbot> {r1}"  # the typed line is echoed, then the reply
        assert term.say("again").strip() == f"again\nbot> {r2}"  # the conversation so far goes with it
        assert "(conversation cleared)" in term.say("/reset")
        assert term.say("hello").strip() == f"hello\nbot> {r1}"
        assert "(system prompt set: Answer in French.)" in term.say("/system Answer in French.")
        assert term.say("/reset").strip().endswith("(conversation cleared)")
        assert term.say("hello").strip() == f"hello\nbot> {r3}"
        term.type("/quit\n")
    finally:
        if term.proc.poll() is None:
            time.sleep(0.5)
    assert term.close() == 0

    term = Terminal([sys.executable, "-m", "effine.cli", "chat", str(tiny_llama_dir)])
    term.read_until("you> ")
    term.type("\x04")  # Ctrl-D: end of input
    assert term.close() == 0
