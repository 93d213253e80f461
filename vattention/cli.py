"""The `vattention` command line: `memory-demo` (more subcommands join as the engine lands)."""

from __future__ import annotations

import argparse
import sys


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
    demo = sub.add_parser("memory-demo", help="show physical memory following requests")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--layout", default="cross_layer", choices=["cross_layer", "per_layer"])
    demo.add_argument("--budget-mib", type=int, default=256)
    demo.set_defaults(func=_memory_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
