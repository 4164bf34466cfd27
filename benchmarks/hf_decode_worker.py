"""transformers' side of benchmarks/decode_bench.py, in its own process (so
torch may live in another Python environment than jax; it imports no jmoe).

    python benchmarks/hf_decode_worker.py FOLDER CONFIG_JSON

Creates a Mixtral model from ``CONFIG_JSON`` with random weights (seed 0),
saves it to ``FOLDER`` with ``save_pretrained`` and prints ``ready``. Then,
for each ``run N`` line on stdin, greedily generates N tokens after the prompt
in ``FOLDER/prompt.npy`` (no early stop), saves them to ``FOLDER/torch_out.npy``
and prints the seconds the ``generate`` call took; ``quit`` ends it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers


def main(folder: str, config_json: str):
    folder = Path(folder)
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**json.loads(config_json))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    print(
        f"ready torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}",
        flush=True,
    )
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            return
        new_tokens = int(command[1])
        ids = torch.tensor(np.load(folder / "prompt.npy"), dtype=torch.long)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )
        seconds = time.perf_counter() - start
        np.save(folder / "torch_out.npy", out.numpy())
        print(f"{seconds}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
