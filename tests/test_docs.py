"""The README's and docs/'s Python code blocks run as written, so they cannot rot.

Each Markdown file's ```python blocks run in order in one namespace (later
blocks may use earlier ones' names). Blocks that are fragments of a larger
program (they use an ``x`` or a checkpoint path the prose describes) get the
missing names from `PREAMBLES`, small stand-ins with the shapes the prose
states; `SUBSTITUTIONS` swaps placeholders such as ``"path/to/..."`` for a test
fixture. A block that stops running fails here with its file and line.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# file -> code run before its first block (names the blocks take as given)
PREAMBLES = {
    "docs/kernels.md": """
import jax, jax.numpy as jnp
tokens, top_k, d_model, d_ff = 64, 2, 32, 48
group_sizes = jnp.array([40, 0, 70, 18], jnp.int32)
keys = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(keys[0], (tokens * top_k, d_model))
w1 = jax.random.normal(keys[1], (4, d_model, d_ff))
w2 = jax.random.normal(keys[2], (4, d_ff, d_model))
dh = jax.random.normal(keys[3], (tokens * top_k, d_ff))
""",
    "docs/expert_parallel.md": """
import jax
x = jax.random.normal(jax.random.key(0), (8, 16, 512))
""",
    "docs/hf.md": """
import jax.numpy as jnp
tokens = jnp.array([[1, 5, 9, 2]], jnp.int32)
prompt = tokens
""",
    "docs/routing.md": """
import jax.numpy as jnp, optax
from flax import nnx
from jmoe import MoEConfig
from jmoe.transformer import MoETransformer, TransformerConfig
moe = MoEConfig(d_model=32, d_ff=64, num_experts=8, top_k=2, score_function="sigmoid",
                expert_bias=True, num_expert_groups=4, top_k_groups=2)
config = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                           max_seq_len=32, moe=moe)
model = MoETransformer(config, rngs=nnx.Rngs(0))
optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
tokens = jnp.zeros((2, 33), jnp.int32)

def loss_fn(model, tokens):
    logits, aux = model(tokens[:, :-1])
    return jnp.mean(logits ** 2) + aux["aux_loss"], aux
""",
}
# file -> (placeholder, replacement) pairs applied to its blocks
SUBSTITUTIONS = {
    "docs/hf.md": [
        ('"path/to/OLMoE-1B-7B"', repr(str(FIXTURES / "olmoe"))),
        ('"out/"', "str(__import__('tempfile').mkdtemp())"),
        ("(model, prompt, 64", "(model, prompt, 16"),
    ],  # the fixture's max_seq_len is 64
}
# file -> code run after its blocks (exercises what the blocks only define)
EPILOGUES = {
    "docs/layer.md": "train_step(layer, optimizer, x, jnp.zeros_like(x))",
    "docs/routing.md": "train_step(model, optimizer, tokens)",
}


# documents whose blocks train or compile a full-size layer: in the slow suite
SLOW = {"docs/layer.md", "docs/routing.md", "docs/hf.md"}


def _documents():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [f.relative_to(ROOT).as_posix() for f in files if BLOCK.search(f.read_text())]


def _params():
    return [pytest.param(d, marks=[pytest.mark.slow] if d in SLOW else []) for d in _documents()]


def test_every_fragment_has_its_preamble():
    """A preamble, substitution or epilogue for a file whose blocks moved away
    would silently test nothing: each must name a file with blocks."""
    documents = set(_documents())
    for table in (PREAMBLES, SUBSTITUTIONS, EPILOGUES, dict.fromkeys(SLOW)):
        assert set(table) <= documents, set(table) - documents


@pytest.mark.parametrize("document", _params())
def test_python_blocks_run(document):
    text = (ROOT / document).read_text()
    namespace = {"__name__": f"docs_{pathlib.Path(document).stem}"}
    exec(compile(PREAMBLES.get(document, ""), f"{document}:preamble", "exec"), namespace)
    for match in BLOCK.finditer(text):
        code = match.group(1)
        for placeholder, replacement in SUBSTITUTIONS.get(document, []):
            assert placeholder in code or placeholder not in text, placeholder
            code = code.replace(placeholder, replacement)
        line = text[: match.start()].count("\n") + 2
        # pad so that tracebacks give the Markdown file's own line numbers
        exec(compile("\n" * (line - 1) + code, document, "exec"), namespace)
    exec(compile(EPILOGUES.get(document, ""), f"{document}:epilogue", "exec"), namespace)
