"""Peak host memory of `jmoe.hf.load` (run as a subprocess by tests/test_hf_sharded.py).

    python tests/helpers/hf_memory.py FOLDER [DATAxEXPERT]

Prints one JSON line: ``growth`` (peak anonymous RSS during the load minus
the anonymous RSS before it, bytes), ``share`` (bytes of this process's device
shards: what the loaded model occupies in host memory on CPU devices) and
``largest`` (bytes of the largest parameter).

Anonymous memory (``RssAnon`` of /proc/self/status, sampled every 2 ms by a
thread) is what the loader holds: the checkpoint's pages that safetensors maps
count in the total RSS (and in ``ru_maxrss``) while they are mapped, though the
kernel can drop them at any time, and how many stay mapped depends on the
machine's load (the total peaked at 0.7 GB alone and 1.5 GB in the full suite).
"""

import json
import os
import sys
import threading

if len(sys.argv) > 2:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import jmoe.hf  # noqa: E402
from jmoe.parallel import make_mesh  # noqa: E402


def anonymous_rss() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


class PeakSampler(threading.Thread):
    """The largest `anonymous_rss` seen while it runs (every 2 ms)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = anonymous_rss(), threading.Event()

    def run(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, anonymous_rss())

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, anonymous_rss())


def main():
    mesh = None
    if len(sys.argv) > 2:
        data, expert = map(int, sys.argv[2].split("x"))
        mesh = make_mesh(data, expert)
    jax.numpy.zeros(1).block_until_ready()  # start the backend before measuring
    before = anonymous_rss()
    sampler = PeakSampler()
    sampler.start()
    model = jmoe.hf.load(sys.argv[1], mesh=mesh, fsdp=mesh is not None)
    peak = sampler.stop()
    params = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    share = sum(s.data.nbytes for p in params for s in p.addressable_shards)
    largest = max(p.nbytes for p in params)
    print(json.dumps({"growth": peak - before, "share": share, "largest": largest}))


if __name__ == "__main__":
    main()
