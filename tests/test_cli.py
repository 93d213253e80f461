"""The command line on the CPU: every subcommand end to end on small models, and its options."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "engine"))
from llm_helpers import save_tiny  # noqa: E402

from vattention import LLM, SamplingParams  # noqa: E402
from vattention.cli import build_parser, main  # noqa: E402
from vattention.cli_options import HELP, engine_config  # noqa: E402
from vattention.engine.llm_engine import EngineConfig  # noqa: E402

SMALL = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "128", "--max-num-seqs",
         "4", "--kv-page-size", "65536"]  # fmt: skip


def test_memory_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["memory-demo", "--steps", "25", "--budget-mib", "64"]) == 0
    out = capsys.readouterr().out
    assert "reserved" in out and "served" in out and "mapped MiB" in out


def test_unknown_command_is_rejected() -> None:
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_every_engine_option_is_a_documented_flag() -> None:
    fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
    assert fields <= set(HELP), f"undocumented: {sorted(fields - set(HELP))}"
    for command in ("serve", "generate", "chat", "bench"):
        text = build_parser().parse_args([command, "--help"] if False else [command]).command
        assert text == command
    helptext = io.StringIO()
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    serve.print_help(helptext)
    for name in fields:
        assert "--" + name.replace("_", "-") in helptext.getvalue()


def test_flags_build_the_engine_config() -> None:
    args = build_parser().parse_args(
        ["serve", "m", "--kv-cache", "paged", "--max-num-seqs", "8", "--enforce-eager",
         "--async-scheduling", "false", "--kv-cache-memory", "1000000"]
    )  # fmt: skip
    config = engine_config(args.model, args)
    assert config == EngineConfig(model="m", kv_cache="paged", max_num_seqs=8,
                                  enforce_eager=True, async_scheduling=False,
                                  kv_cache_memory=1000000)  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-num-seqs", "many"])
    args = build_parser().parse_args(
        ["serve", "m", "--attention-options", '{"cudnn_min_tokens": 8192}']
    )
    assert engine_config(args.model, args).attention_options == {"cudnn_min_tokens": 8192}
    for bad in ("[1]", "{nope"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "m", "--attention-options", bad])


def test_bad_option_values_exit_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "tiny", "--load-format", "dummy", "--max-num-seqs", "0", *SMALL[:4]])
    assert exc.value.code == 2
    assert "max_num_seqs" in capsys.readouterr().err


def test_generate_from_arguments_file_and_stdin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    save_tiny("llama", tmp_path / "m", vocab_size=300)
    model = str(tmp_path / "m")
    params = SamplingParams(temperature=0, max_tokens=6)
    penal = SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.5,
                           frequency_penalty=0.5)  # fmt: skip
    with LLM(model, device="cpu", dtype="float32", max_model_len=128, max_num_seqs=4,
             kv_page_size=65536) as llm:  # fmt: skip
        want = [o.text for o in llm.generate(["hello", "abc"], params, use_tqdm=False)]
        want_pen = [o.text for o in llm.generate(["hello"], penal, use_tqdm=False)]
    common = ["--model", model, "--no-chat-template", "--max-tokens", "6", *SMALL]
    pen = ["--repetition-penalty", "1.5", "--frequency-penalty", "0.5"]
    assert main(["generate", "hello", "--output", "jsonl", *pen, *common]) == 0
    assert [json.loads(x)["text"] for x in capsys.readouterr().out.splitlines()] == want_pen
    assert main(["generate", "hello", "abc", "--output", "jsonl", *common]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == want and [x["prompt"] for x in lines] == ["hello", "abc"]
    assert all(x["finish_reason"] in ("stop", "length") for x in lines)
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\nabc\n')
    assert (
        main(["generate", "--file", str(tmp_path / "p.jsonl"), "--output", "jsonl", *common]) == 0
    )
    assert [json.loads(x)["text"] for x in capsys.readouterr().out.splitlines()] == want
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nabc\n"))
    assert main(["generate", "--output", "jsonl", *common]) == 0
    assert [json.loads(x)["text"] for x in capsys.readouterr().out.splitlines()] == want
    with pytest.raises(SystemExit):  # no chat template on this tiny model: a clear error
        main(["generate", "hello", "--model", model, *SMALL])
    assert "chat template" in capsys.readouterr().err


def test_bench_reports_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "tiny", "--load-format", "dummy", "--trace", "uneven", "--num-requests",
            "6", "--prompt-len", "16", "--output-len", "8", "--json", *SMALL]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == 6 and result["output_tokens"] > 0
    assert result["output_tok_per_s"] > 0 and result["config"]["model"] == "tiny"


def test_bench_shared_prefix_trace_hits_the_prefix_cache(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Requests after the first find the system prompt's whole pages cached (4 KiB pages: 8
    tokens of the tiny preset, so the vAttention cache shares them)."""
    args = ["bench", "tiny", "--load-format", "dummy", "--trace", "shared-prefix",
            "--num-requests", "6", "--prompt-len", "64", "--output-len", "4", "--json",
            *SMALL, "--kv-page-size", "4096"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == 6 and result["prompt_tokens"] == 6 * (64 + 8)
    assert result["prefix_hit_tokens"] >= 4 * 64  # the warm-up published them already
    # the prefix's 8 pages (>= the default 4) are mapped by two slots: a segment is built
    assert result["prefix_segments_built"] >= 1


def test_make_trace_shapes() -> None:
    from vattention.bench import make_trace

    trace = make_trace("shared-prefix", 5, 40, 7, vocab=100, max_len=128, seed=1)
    system = trace[0][0][:40]
    assert all(ids[:40] == system and len(ids) == 45 and o == 7 for ids, o in trace)
    assert len({tuple(ids[40:]) for ids, _ in trace}) == 5  # distinct suffixes
    short = make_trace("shared-prefix", 2, 500, 7, vocab=100, max_len=128)
    assert all(len(ids) + o < 128 for ids, o in short)  # capped to fit, suffixes kept
    assert short[0][0][:-62] == short[1][0][:-62] and short[0][0][-62:] != short[1][0][-62:]
    with pytest.raises(ValueError, match="trace must be one of"):
        make_trace("nope", 2, 4, 4, vocab=100, max_len=128)


def test_chat_streams_and_keeps_the_conversation(tmp_path: Path) -> None:
    from vattention.chat import run_chat
    from vattention.engine.llm_engine import LLMEngine

    save_tiny("llama", tmp_path / "m", vocab_size=300)
    config = EngineConfig(model=str(tmp_path / "m"), device="cpu", dtype="float32",
                          max_model_len=256, max_num_seqs=2, kv_page_size=65536)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=5)
    engine = LLMEngine(config)
    template = engine.tokenizer.apply_chat_template
    sent: list[str] = []
    add = engine.add_request

    def record(prompt: str, p: SamplingParams) -> str:
        sent.append(prompt)
        return add(prompt, p)

    engine.add_request = record  # type: ignore[method-assign]
    out = io.StringIO()
    assert run_chat(config, params, system="be brief", stdin=io.StringIO("hi\n\nagain\n/exit\n"),
                    stdout=out, engine=engine) == 0  # fmt: skip
    assert engine.cache.closed
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert sent[0] == template(history, tokenize=False, add_generation_prompt=True)
    with LLM(str(tmp_path / "m"), device="cpu", dtype="float32", max_model_len=256,
             max_num_seqs=2, kv_page_size=65536) as llm:  # fmt: skip
        first = llm.generate([sent[0]], params, use_tqdm=False)[0].text
        history += [{"role": "assistant", "content": first}, {"role": "user", "content": "again"}]
        assert sent[1] == template(history, tokenize=False, add_generation_prompt=True)
        second = llm.generate([sent[1]], params, use_tqdm=False)[0].text
    assert out.getvalue().count("> ") >= 3 and first in out.getvalue() and second in out.getvalue()
