"""One process of the multi-process `jmoe.hf` test (tests/test_hf_sharded.py):

    python -m experiments.launch_local --processes 2 -- helpers.hf_multiprocess_worker \\
        FIXTURE OUT --report DIR --host-devices 4 [--max-shard-bytes N]

(``tests/`` on ``PYTHONPATH``). Joins the distributed runtime, loads the
Hugging Face folder FIXTURE on a 2 x 4 mesh over both processes with FSDP,
saves it to OUT (every process calls `jmoe.hf.save`; process 0 writes) and
writes ``DIR/process-I.json``: the process's index and device count, the bytes
it read from the checkpoint, the checkpoint's size and the safetensors files it
wrote. An exception exits the process at once with status 1 (printing the
traceback), so that launch_local stops the other one: a normal exit would wait
in ``jax.distributed.shutdown`` for the other process, itself waiting in a
collective for this one.
"""

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from experiments import distributed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--max-shard-bytes", type=int, default=60_000)
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    distributed.start_runtime(args)

    import jax
    import safetensors.numpy

    import jmoe.hf
    from jmoe.hf.files import Checkpoint
    from jmoe.parallel import make_mesh

    read_bytes = 0
    original_read = Checkpoint.read

    def counting_read(self, name, index=()):
        nonlocal read_bytes
        part = original_read(self, name, index)
        read_bytes += part.nbytes
        return part

    Checkpoint.read = counting_read
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    model = jmoe.hf.load(args.fixture, mesh=make_mesh(2, 4), fsdp=True)
    Checkpoint.read = original_read
    total = sum(part.nbytes for part in jmoe.hf.files.read_tensors(args.fixture).values())

    written = []
    original_save_file = safetensors.numpy.save_file

    def recording_save_file(tensors, filename, *a, **kw):
        written.append(Path(filename).name)
        return original_save_file(tensors, filename, *a, **kw)

    safetensors.numpy.save_file = recording_save_file  # what ShardWriter writes with
    jmoe.hf.save(model, args.out, max_shard_bytes=args.max_shard_bytes)
    safetensors.numpy.save_file = original_save_file
    report = dict(
        folder_after_save=sorted(p.name for p in Path(args.out).iterdir()),  # save waits
        process=jax.process_index(),
        local_devices=jax.local_device_count(),
        read_bytes=read_bytes,
        checkpoint_bytes=total,
        written=written,
    )
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / f"process-{jax.process_index()}.json").write_text(json.dumps(report))
    print("done", report, flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
