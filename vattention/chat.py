"""`vattention chat`: an interactive terminal chat that streams the model's reply.

One `LLMEngine`, one request at a time: the conversation so far is rendered with the model's
chat template, the reply is streamed token by token (`step(include_running=True)`), and both
turns are kept for the next prompt. Ctrl-C during a reply aborts it (its slot is freed) and
returns to the prompt; Ctrl-D or `/exit` ends the chat and closes the engine.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def run_chat(
    config: Any,
    params: Any,
    system: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    engine: Any = None,
) -> int:
    """Chat until end of input; `engine` (an `LLMEngine`, closed at the end) else one is built
    from `config`."""
    from vattention.engine.llm_engine import LLMEngine

    src, out = stdin or sys.stdin, stdout or sys.stdout
    engine = engine if engine is not None else LLMEngine(config)
    tok = engine.tokenizer
    if tok is None or not hasattr(tok, "apply_chat_template"):
        engine.close()
        raise ValueError(f"model {engine.config.model!r} has no chat template")
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    out.write(f"vattention chat ({engine.config.model}); /exit or Ctrl-D to quit\n")
    try:
        while True:
            out.write("> ")
            out.flush()
            line = src.readline()
            if not line or line.strip() == "/exit":
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.strip()})
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            reply = _stream(engine, prompt, params, out)
            messages.append({"role": "assistant", "content": reply})
    finally:
        engine.close()
    out.write("\n")
    return 0


def _stream(engine: Any, prompt: str, params: Any, out: TextIO) -> str:
    """Run one request, writing its text as it grows; returns the final text."""
    rid = engine.add_request(prompt, params)
    shown = ""
    try:
        while engine.has_unfinished_requests():
            for o in engine.step(include_running=True):
                if o.request_id != rid:
                    continue
                text = o.text
                if text.startswith(shown):
                    out.write(text[len(shown) :])
                    out.flush()
                    shown = text
    except KeyboardInterrupt:
        engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()
        out.write(" [interrupted]")
    out.write("\n")
    return shown
