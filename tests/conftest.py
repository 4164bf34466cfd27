"""Session setup: 8 host CPU devices, so the expert-parallel tests can build
2 x 4 and 1 x 8 meshes in the same pytest process as every other test.

XLA reads the flag when its CPU client starts, so it must be set before jax is
first imported; pytest imports this file before any test module. Single-device
tests are unaffected: they run on device 0 exactly as before. Compiled
programs are shared through a persistent compilation cache. Tests marked
``gpu`` skip without a GPU.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

# One persistent XLA compilation cache (per user, in the temp dir, kept between runs) for
# the run's processes: both pytest-xdist workers and the CLI subprocesses the tests start
# (they inherit the environment) compile the same train steps, and on 2 cores compiling is
# most of the suite's time. Keyed by the program, the compile options and the jax version,
# so a changed program is compiled anew.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"jmoe-tests-xla-{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """~40 kB of varied text: pseudo-random words with line breaks."""
    rng = np.random.default_rng(0)
    words = ["the", "of", "and", "unto", "lord", "said", "king", "land", "his", "them"]
    lines = [" ".join(rng.choice(words, size=rng.integers(4, 12))) for _ in range(800)]
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip without a GPU (``pytest -m gpu`` selects only them)."""
    import jax

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
