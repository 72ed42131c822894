"""``python -m diffperf``: list presets, compare saved runs, trends, baselines, launch isolated runs, confirm gate flags by A/B, measure one case."""

from __future__ import annotations

import argparse
import sys


def cmd_presets(args: argparse.Namespace) -> int:
    from diffperf.presets import PRESETS, parameter_counts

    rows = []
    for preset in PRESETS.values():
        counts = parameter_counts(preset)
        comps = ", ".join(f"{name} {n:,}" for name, n in counts.items())
        rows.append((preset.name, f"{preset.height}x{preset.width}", str(preset.default_steps), f"{sum(counts.values()):,}", comps))
    header = ("preset", "resolution", "steps", "parameters", "components")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print("\n(counted on the meta device: no weight was allocated)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import json

    from diffperf import api

    record = api.run_case(args.recipe, framework=args.framework, preset=args.preset, device=args.device,
                          steps=args.steps, batch_size=args.batch_size, rounds=args.rounds)
    print(json.dumps({k: record[k] for k in ("case", "median_s", "cv", "cold_start_s", "compile_s",
                                              "peak_memory_bytes", "images_per_s", "breakdown")}, indent=2, default=str))
    return 0


# Subcommands with their own argument parsers: the module whose main(argv) runs each, and its help line.
SUBCOMMANDS = {
    "compare": ("diffperf.compare", "compare two saved runs"),
    "trend": ("diffperf.trend", "change points over saved runs and baseline histories"),
    "baseline": ("diffperf.baselines", "fold saved runs into the baseline history, check baseline files"),
    "launch": ("diffperf.launcher", "run pytest in isolated processes, one worker per device, and merge the results"),
    "confirm": ("diffperf.ab_confirm", "re-measure the gate's flags of a run as A/B against their baseline commits"),
}

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffperf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="list the presets with their parameter counts")
    p.set_defaults(func=cmd_presets)
    for name, (_module, help_line) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=f"{help_line} (see python -m diffperf {name} -h)", add_help=False)
        p.set_defaults(func=None)
    p = sub.add_parser("run", help="build and measure one case outside pytest")
    p.add_argument("recipe", help="recipe tag or name, e.g. fp32-sdpa or bf16-sdpa-cl-compile")
    p.add_argument("--framework", default="torch", choices=("torch", "tf", "jax"), help="default: torch")
    p.add_argument("--preset", default="tiny", help="default: tiny")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "tpu"), help="default: cpu")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=1, help="default: 1")
    p.add_argument("--rounds", type=int, default=5, help="default: 5")
    p.set_defaults(func=cmd_run)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
