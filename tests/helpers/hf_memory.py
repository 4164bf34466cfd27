"""Peak host memory of `jmoe.hf.load` (run as a subprocess by tests/test_hf_sharded.py).

    python tests/helpers/hf_memory.py FOLDER [DATAxEXPERT]

Prints one JSON line: ``growth`` (peak RSS during the load minus the RSS
before it, bytes), ``share`` (bytes of this process's device shards: what
the loaded model occupies in host memory on CPU devices) and ``largest``
(bytes of the largest parameter).
"""

import json
import os
import resource
import sys

if len(sys.argv) > 2:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import jmoe.hf  # noqa: E402
from jmoe.parallel import make_mesh  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    mesh = None
    if len(sys.argv) > 2:
        data, expert = map(int, sys.argv[2].split("x"))
        mesh = make_mesh(data, expert)
    jax.numpy.zeros(1).block_until_ready()  # start the backend before measuring
    before = rss()
    model = jmoe.hf.load(sys.argv[1], mesh=mesh, fsdp=mesh is not None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    share = sum(s.data.nbytes for p in params for s in p.addressable_shards)
    largest = max(p.nbytes for p in params)
    print(json.dumps({"growth": peak - before, "share": share, "largest": largest}))


if __name__ == "__main__":
    main()
