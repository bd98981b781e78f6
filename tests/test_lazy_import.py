"""`import bitdance_diffusers` is light, and the pipelines still reach diffusers' `DiffusionPipeline.from_pretrained`
whatever the import order."""

import subprocess
import sys
import textwrap

import pytest

import bitdance_diffusers


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_import_loads_no_heavy_library():
    out = run_python("""
        import sys
        import bitdance_diffusers
        print([name for name in ("torch", "diffusers", "transformers", "torchao", "bitsandbytes") if name in sys.modules])
    """)
    assert out == "[]"


LOAD_THE_SHIPPED_MODEL = """
    from bitdance_diffusers.pretrained import DEMO_MODEL_PATH
    from diffusers import DiffusionPipeline
    import diffusers, sys
    pipe = DiffusionPipeline.from_pretrained(DEMO_MODEL_PATH)
    hooks = [type(finder).__name__ for finder in sys.meta_path if "Diffusers" in type(finder).__name__]
    print(type(pipe).__name__, type(pipe.scheduler).__name__, diffusers.BitDanceImageNetPipeline.__name__, hooks)
"""


@pytest.mark.parametrize(
    "first",
    [
        "import bitdance_diffusers",  # the documented order: registered when diffusers is imported next
        "import diffusers\nimport bitdance_diffusers",  # diffusers first: registered at once
        "from bitdance_diffusers.models import BitDanceTokenizer",  # diffusers imported from inside our models
        "import bitdance_diffusers.pipelines.pipeline_bitdance",  # ... from inside a pipeline module
    ],
)
def test_pipelines_are_registered_with_diffusers_in_any_import_order(first):
    out = run_python(first + "\n" + textwrap.dedent(LOAD_THE_SHIPPED_MODEL))
    assert out == "BitDancePipeline BinaryFlowScheduler BitDanceImageNetPipeline []"


def test_every_export_resolves():
    for name in bitdance_diffusers.__all__:
        assert getattr(bitdance_diffusers, name) is not None
    assert set(bitdance_diffusers.__all__) <= set(dir(bitdance_diffusers))
    from diffusers import ModelMixin, SchedulerMixin

    # model_index.json entries that name the package itself (["bitdance_diffusers", "BitDanceTokenizer"]) need these.
    assert (bitdance_diffusers.ModelMixin, bitdance_diffusers.SchedulerMixin) == (ModelMixin, SchedulerMixin)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        bitdance_diffusers.NoSuchThing  # noqa: B018
