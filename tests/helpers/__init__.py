"""Helpers shared by the test modules, imported as a package (pytest puts ``tests/`` on
``sys.path``): ``from helpers import numpy_reference as ref``,
``from helpers.host_devices import host_cpus``. No test module imports another.

* `numpy_reference`: independent float64 NumPy loops (layout, products, router,
  permutation, layers, DeepSeek routing) that share no code with the library.
* `jaxpr_tools`: tracing a layer on abstract shapes and walking its jaxpr.
* `product_harness`: every block-sparse product's output and VJPs in one call.
* `host_devices`: the 8 host CPU devices of the multi-device tests, and the bytes
  placed arrays hold per device.
* `expert_parallel`: the expert-parallel tests' problems, single-device and mesh
  runs, the emulated ``ragged_all_to_all`` and an abstract GPU mesh.
* `hf_fixtures`: the Hugging Face fixtures in ``tests/fixtures/hf``.
* `scale_out_worker`: ``experiments.train`` with a tiny model, run as
  ``python -m helpers.scale_out_worker`` by the multi-process tests.
* `launch`: running such a worker module in 2 JAX processes (`launch_local`).
* `hf_multiprocess_worker`, `hf_memory`: `jmoe.hf` load/save across 2 processes, and
  the peak host memory of a load (subprocesses of test_hf_sharded.py).
"""
