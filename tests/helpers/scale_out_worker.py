"""``experiments.train``'s command line with a tiny model, for the multi-process
tests (``python -m experiments.launch_local --processes 2 -- helpers.scale_out_worker
<experiments.train flags>``, with ``tests/`` on ``PYTHONPATH``): the xs preset
would spend minutes compiling on the CI's 2 cores."""

import dataclasses

from experiments import distributed, train
from jmoe import MoEConfig
from jmoe.transformer import TransformerConfig

SEQ = 16


def tiny_model(ffn: str = "dmoe") -> TransformerConfig:
    """2 blocks of width 16, 8 experts (so a 2 x 4 mesh splits them), top-1."""
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=1, block_size=32, impl="xla")
    return TransformerConfig(
        vocab_size=256, d_model=16, num_layers=2, num_heads=2, max_seq_len=SEQ, moe=moe, ffn=ffn
    )


def main(argv=None):
    args = train.parse_args(argv)
    distributed.start_runtime(args)
    config, name = train.config_from_args(args)
    return train.train(dataclasses.replace(config, model=tiny_model(args.ffn)), name)


if __name__ == "__main__":
    main()
