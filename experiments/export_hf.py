"""Write a training run's latest checkpoint as a Hugging Face folder.

    python -m experiments.export_hf --run runs/ft --out path/to/hf [--fused]

The model configuration is the run's ``model_config.json`` (written by
``experiments.train``; runs from before it: the preset its name gives, see
`experiments.generate`). Models Hugging Face's Mixtral / Qwen3-MoE / OLMoE
cannot express (GeLU experts, capacity-factor MoE, ``moe_every=2``, ...)
are refused with a message naming the field. The folder loads with
`jmoe.hf.load` and transformers' ``from_pretrained``; see docs/hf.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jmoe.hf
from experiments.generate import run_model_args
from experiments.presets import preset
from experiments.run_config import latest_model, read_model_config
from jmoe.hf.config import to_hf
from jmoe.transformer import TransformerConfig


def run_config(run_dir: Path) -> TransformerConfig:
    """The model configuration of a run (``model_config.json``, else its name's preset)."""
    config = read_model_config(run_dir)
    if config is not None:
        return config
    names = ("preset", "ffn", "capacity_factor", "moe_every")
    spec = run_model_args(run_dir, argparse.Namespace(**dict.fromkeys(names)))
    model = preset(spec["preset"], ffn=spec["ffn"], capacity_factor=spec["capacity_factor"])
    return model.replace(moe_every=spec["moe_every"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.export_hf", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--run", required=True, help="run directory of experiments.train")
    parser.add_argument("--out", required=True, help="Hugging Face folder to write")
    parser.add_argument(
        "--fused", action="store_true", help="experts fused (experts.gate_up_proj [E, 2f, d])"
    )
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    """Command-line entry; the folder written."""
    args = parse_args(argv)
    run_dir = Path(args.run)
    config = run_config(run_dir)
    try:
        to_hf(config)  # refuses before reading the checkpoint
    except ValueError as error:
        raise SystemExit(f"export_hf: the model of {run_dir} cannot be saved: {error}") from None
    model, step = latest_model(run_dir, config)
    jmoe.hf.save(model, args.out, fused=args.fused)
    print(f"[{run_dir}] step {step} -> {args.out}", file=sys.stderr)
    return Path(args.out)


if __name__ == "__main__":
    main()
