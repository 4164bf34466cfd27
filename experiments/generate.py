"""Sample text from a trained run or token ids from a Hugging Face checkpoint.

    python -m experiments.generate --checkpoint runs/xs-dmoe --prompt "In the beginning" \\
        --max-new-tokens 200
    python -m experiments.generate --hf path/to/olmoe --prompt-ids "1 2 3" --max-new-tokens 20
    python -m experiments.generate --hf path/to/qwen3 --prompt "Hello" --temperature 0.8 --top-p 0.9

``--checkpoint`` reads the latest Orbax checkpoint of an ``experiments.train``
run directory; its model (preset, FFN kind, capacity factor, MoE spacing) is
read from the run's name (``summary.json`` or the directory name, e.g.
``xs-moe-cf1.5``) unless ``--preset`` / ``--ffn`` / ... say otherwise. Its
tokens are UTF-8 bytes. ``--hf`` loads a folder with `jmoe.hf.load`; text
prompts need its ``tokenizer.json`` and the ``tokenizers`` package, otherwise
pass ``--prompt-ids`` and read token ids back. Generation uses `jmoe.generate`
(greedy unless ``--temperature`` > 0); a continuation longer than the model's
``max_seq_len`` is allowed (RoPE has no learned positions) with a warning.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jax
import numpy as np

import jmoe
import jmoe.hf
from experiments import data
from experiments.presets import PRESETS, preset
from experiments.run_config import latest_model
from jmoe.transformer import FFN_KINDS, MoETransformer

RUN_NAME = re.compile(
    r"^(?P<preset>[a-z]+)-(?P<ffn>[a-z]+)(?:-cf(?P<cf>[0-9.]+))?"
    r"(?:-every(?P<every>\d+))?$"
)


def run_model_args(run_dir: Path, args: argparse.Namespace) -> dict:
    """``preset`` / ``ffn`` / ``capacity_factor`` / ``moe_every`` of a run:
    the command line's, else parsed from the run name (`experiments.train.run_name`)."""
    summary = run_dir / "summary.json"
    name = json.loads(summary.read_text())["name"] if summary.exists() else run_dir.name
    parsed = RUN_NAME.match(name)
    found = parsed.groupdict() if parsed else {}
    pick = lambda flag, key, cast, default: (
        getattr(args, flag)
        if getattr(args, flag) is not None
        else cast(found[key])
        if found.get(key)
        else default
    )
    model = dict(
        preset=pick("preset", "preset", str, None),
        ffn=pick("ffn", "ffn", str, None),
        capacity_factor=pick("capacity_factor", "cf", float, 1.0),
        moe_every=pick("moe_every", "every", int, 1),
    )
    if model["preset"] not in PRESETS or model["ffn"] not in FFN_KINDS:
        raise ValueError(
            f"cannot tell the model of {run_dir} from its name {name!r}: "
            f"pass --preset {{{','.join(PRESETS)}}} and --ffn {{{','.join(FFN_KINDS)}}}"
        )
    return model


def load_run(run_dir: Path, args: argparse.Namespace) -> MoETransformer:
    """The model of the latest checkpoint of an ``experiments.train`` run."""
    spec = run_model_args(run_dir, args)
    config = preset(
        spec["preset"], ffn=spec["ffn"], capacity_factor=spec["capacity_factor"]
    ).replace(moe_every=spec["moe_every"])
    model, step = latest_model(run_dir, config)
    print(f"[{run_dir}] step {step}: {spec}", file=sys.stderr)
    return model


def hf_tokenizer(folder: Path):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or None."""
    if not (folder / "tokenizer.json").exists():
        return None
    try:
        import tokenizers
    except ImportError:
        return None
    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run directory of experiments.train")
    source.add_argument("--hf", help="Hugging Face model folder (mixtral, qwen3_moe, olmoe)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt token ids, separated by spaces or commas")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--preset", choices=PRESETS, help="--checkpoint: model preset")
    parser.add_argument("--ffn", choices=FFN_KINDS, help="--checkpoint: FFN kind")
    parser.add_argument("--capacity-factor", type=float, help="--checkpoint: of --ffn moe")
    parser.add_argument("--moe-every", type=int, choices=(1, 2), help="--checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.checkpoint:
        model = load_run(Path(args.checkpoint), args)
        encode, decode = data.encode, data.decode
    else:
        model = jmoe.hf.load(args.hf)
        tokenizer = hf_tokenizer(Path(args.hf))
        encode = decode = None
        if tokenizer is not None:
            encode = lambda text: tokenizer.encode(text).ids
            decode = lambda ids: tokenizer.decode(list(ids))
    if args.prompt is not None:
        if encode is None:
            raise SystemExit(
                "this checkpoint has no usable tokenizer (tokenizer.json and the "
                "tokenizers package): pass --prompt-ids"
            )
        ids = list(encode(args.prompt))
    else:
        ids = [int(t) for t in re.split(r"[,\s]+", args.prompt_ids.strip())]
    total = len(ids) + args.max_new_tokens
    if total > model.config.max_seq_len:
        print(
            f"note: {total} positions exceed the model's max_seq_len="
            f"{model.config.max_seq_len} (its training length)",
            file=sys.stderr,
        )
        model.config = model.config.replace(max_seq_len=total)
    tokens = jmoe.generate(
        model,
        np.asarray([ids], np.int32),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        rng=jax.random.key(args.seed) if args.temperature > 0 else None,
    )
    new = np.asarray(tokens)[0, len(ids) :]
    text = (args.prompt or "") + decode(new) if decode is not None else " ".join(map(str, new))
    print(text)
    return text


if __name__ == "__main__":
    main()
