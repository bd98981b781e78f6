"""The docs run: every ```python block of README.md and docs/*.md is executed, and every documented command parses.

Each Python block is one test, named after its page and its rank among the page's Python blocks
(``docs/text-to-image.md:3`` is the third). The blocks of a page run in order in one namespace, as in a notebook: a
block may use the ``pipe`` an earlier block of its page loaded. A block selected alone (``-k``) first runs the ones
before it. Each page works in a temporary folder of its own, which holds ``my_pictures/``: four captioned 128x128
pictures of the shapes set (a ``.txt`` caption beside each image), for the training examples.

The blocks are written for real checkpoints on a GPU. Here they run on a CPU in seconds, through these swaps and no
others (docs/README.md says the same to readers):

1. Model names become small local models (`MODEL_NAMES`): the string literals "BitDance-14B-64x-diffusers" and
   "BitDance-14B-16x-diffusers" the shipped shapes model (a copy of ``DEMO_MODEL_PATH``: 128x128, 16 tokens per
   block); "BitDance-B-4x-diffusers" a tiny random `BitDanceImageNetPipeline` with the ImageNet-1k label names (64x64,
   from `random_pipeline.build_random_imagenet_pipeline`); "my-bitdance-lora" and "my-other-bitdance-lora" rank-4
   LoRAs of the shapes model; "ae_d16c32" the shapes model's tokenizer. Any other string literal naming a
   "BitDance-..." model fails the test.
2. The accelerator is the CPU: the string literal "cuda" (or "cuda:N") becomes "cpu"; ``enable_model_cpu_offload()``
   and ``enable_sequential_cpu_offload()`` get ``device="cpu"`` (diffusers refuses them on a machine without an
   accelerator otherwise) and group offloading ``use_stream=False`` (a CPU has no streams).
3. Sizes: ``height=``, ``width=`` and ``resolution=`` followed by a number become 128, the shapes model's size.
4. Training: ``max_train_steps=`` followed by a number becomes 2.
5. While a block runs (monkeypatched): a call of `BitDancePipeline` or `BitDanceImageNetPipeline` samples at most
   `MAX_HEAD_STEPS` head steps per block, whatever ``num_inference_steps`` says (or its default); CUDA graph capture
   is the eager stand-in of ``tests/cuda_graph_stub.py`` (``enable_cuda_graphs()`` runs all its bookkeeping, a replay
   reruns the captured function); ``torch.compile`` uses ``backend="eager"`` and drops ``mode`` (Dynamo still traces
   the module, so ``fullgraph=True`` still fails on a graph break or a recompile past the limit; no Inductor code
   generation).

The blocks run on one torch thread (see `one_thread`). A block that cannot run on a CPU even so is marked on the line
before it with ``<!-- docs-test: skip (reason) -->``; it is still compiled, and
`test_skipped_blocks_are_few_and_say_why` counts and lists them. Commands meant to be typed (``bitdance ...``, the
converters, the example scripts, also under ``accelerate launch``) live in ```bash blocks;
`test_documented_commands_parse` runs each script until its real parser has parsed the arguments, so a documented flag
cannot vanish.
"""

import argparse
import ast
import io
import logging
import re
import runpy
import shlex
import shutil
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cuda_graph_stub import eager_graphs  # noqa: F401 (fixture: CUDA graph capture replaced by an eager stand-in)


REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MAX_HEAD_STEPS = 2
MAX_SKIPPED_BLOCKS = 3
SKIP_MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<language>[\w+-]*)")


# Collecting the blocks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository
    index: int  # rank among the page's blocks of this language, from 1
    line: int  # line of the opening fence in the page, from 1
    code: str
    skip: str | None = None  # the reason of a skip marker

    @property
    def id(self) -> str:
        return f"{self.page}:{self.index}"


def fenced_blocks(path: Path) -> list[tuple[str, int, str, str | None]]:
    """``(language, fence line, code, skip reason)`` of every fenced block of a Markdown page, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, number = [], 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if not opening:
            if "docs-test:" in lines[number] and not SKIP_MARKER.search(lines[number]):
                raise ValueError(f"{path.name}:{number + 1}: unknown marker; write <!-- docs-test: skip (why) -->")
            number += 1
            continue
        end = next((index for index in range(number + 1, len(lines))
                    if lines[index].strip().startswith(opening["fence"]) and not lines[index].strip().strip("`~")),
                   None)  # fmt: skip
        if end is None:
            raise ValueError(f"{path.name}:{number + 1}: the code block opened here is never closed")
        previous = next((lines[index] for index in range(number - 1, -1, -1) if lines[index].strip()), "")
        marker = SKIP_MARKER.search(previous)
        indent = len(opening["indent"])
        code = "\n".join(line[indent:] for line in lines[number + 1 : end]) + "\n"
        blocks.append((opening["language"].lower(), number + 1, code, marker["reason"].strip() if marker else None))
        number = end + 1
    return blocks


def collect(languages: tuple[str, ...]) -> list[Block]:
    blocks = []
    for path in PAGES:
        page = path.relative_to(REPO).as_posix()
        found = [block for block in fenced_blocks(path) if block[0] in languages]
        blocks += [Block(page, index, line, code, skip) for index, (_, line, code, skip) in enumerate(found, 1)]
    return blocks


PYTHON_BLOCKS = collect(("python", "py"))
BASH_BLOCKS = collect(("bash", "sh", "shell", "console"))


# The swaps ----------------------------------------------------------------------------------------------------------


def build_imagenet_pipeline(folder: Path):
    from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline

    build_random_imagenet_pipeline(block_size=4).save_pretrained(folder)


def build_lora(folder: Path, shapes_model: Path, seed: int):
    from bitdance_diffusers import BitDancePipeline
    from bitdance_diffusers.training import add_trainable_lora, save_lora

    pipe = BitDancePipeline.from_pretrained(shapes_model, dtype=torch.float32)
    add_trainable_lora(pipe, rank=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT starts lora_B at zero: give the adapter an effect
        for name, parameter in [*pipe.language_model.named_parameters(), *pipe.diffusion_head.named_parameters()]:
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
    save_lora(pipe, folder)


class ModelFolders:
    """The local stand-ins of the model names the docs use, built on first use and kept for the module."""

    def __init__(self, root: Path):
        from bitdance_diffusers.pretrained import DEMO_MODEL_PATH

        self.root, self.folders = root, {}
        # A copy, so that no block could ever write into the package's own folder.
        self.shapes_model = root / "bitdance-shapes-128"
        shutil.copytree(DEMO_MODEL_PATH, self.shapes_model)

    def path(self, name: str) -> Path:
        if name not in self.folders:
            kind = MODEL_NAMES[name]
            if kind == "shapes":
                self.folders[name] = self.shapes_model
            elif kind == "shapes-tokenizer":
                self.folders[name] = self.shapes_model / "vae"
            elif kind == "imagenet":
                self.folders[name] = self.root / name
                build_imagenet_pipeline(self.folders[name])
            else:  # "lora"
                self.folders[name] = self.root / name
                build_lora(self.folders[name], self.shapes_model, seed=len(self.folders))
        return self.folders[name]


# The names the docs use -> what runs in their place (see the module docstring).
MODEL_NAMES = {
    "BitDance-14B-64x-diffusers": "shapes",
    "BitDance-14B-16x-diffusers": "shapes",
    "BitDance-B-4x-diffusers": "imagenet",
    "my-bitdance-lora": "lora",
    "my-other-bitdance-lora": "lora",
    "ae_d16c32": "shapes-tokenizer",
}
CODE_SWAPS = [
    (re.compile(r"\b(enable_(?:model|sequential)_cpu_offload)\(\)"), r'\1(device="cpu")'),
    (re.compile(r"\buse_stream=True\b"), "use_stream=False"),
    (re.compile(r"\b(height|width|resolution)=\d+"), r"\1=128"),
    (re.compile(r"\bmax_train_steps=\d+"), "max_train_steps=2"),
]


def swap_strings(code: str, models: ModelFolders) -> str:
    """Rules 1 and 2 on the string literals of ``code`` (found with Python's tokenizer, so comments stay as written)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    lines = code.splitlines(keepends=True)
    replacements = []
    for token in tokens:
        if token.type != tokenize.STRING:
            continue
        try:
            value = ast.literal_eval(token.string)
        except (ValueError, SyntaxError):  # f-strings
            continue
        if not isinstance(value, str):
            continue
        if value in MODEL_NAMES:
            replacements.append((token.start, token.end, repr(str(models.path(value)))))
        elif value == "cuda" or value.startswith("cuda:"):
            replacements.append((token.start, token.end, '"cpu"'))
        elif re.search(r"BitDance-[\w.-]*", value):
            raise AssertionError(f"The model name {value!r} has no stand-in: add it to MODEL_NAMES in test_docs.py.")
    for (start_row, start_col), (end_row, end_col), text in reversed(replacements):
        assert start_row == end_row, "a multi-line string literal naming a model"
        line = lines[start_row - 1]
        lines[start_row - 1] = line[:start_col] + text + line[end_col:]
    return "".join(lines)


def swapped(block: Block, models: ModelFolders) -> str:
    code = swap_strings(block.code, models)
    for pattern, replacement in CODE_SWAPS:
        code = pattern.sub(replacement, code)
    return code


def test_the_swaps():
    class Names:
        def path(self, name):
            return Path(f"/local/{name}")

    code = """pipe = X.from_pretrained("BitDance-14B-64x-diffusers", dtype=torch.float16).to("cuda")  # "cuda"
pipe.enable_model_cpu_offload()
image = pipe("a fox", height=1024, width=512, generator=torch.Generator('cuda:1'))
apply_group_offloading(m, onload_device=torch.device("cuda"), use_stream=True)
config = TrainingConfig(max_train_steps=1000); sizes = bucket_sizes(s, resolution=1024)
"""
    expected = """pipe = X.from_pretrained('/local/BitDance-14B-64x-diffusers', dtype=torch.float16).to("cpu")  # "cuda"
pipe.enable_model_cpu_offload(device="cpu")
image = pipe("a fox", height=128, width=128, generator=torch.Generator("cpu"))
apply_group_offloading(m, onload_device=torch.device("cpu"), use_stream=False)
config = TrainingConfig(max_train_steps=2); sizes = bucket_sizes(s, resolution=128)
"""
    assert swapped(Block("x.md", 1, 1, code), Names()) == expected
    with pytest.raises(AssertionError, match="BitDance-L-1x-diffusers.*MODEL_NAMES"):
        swapped(Block("x.md", 1, 1, 'DiffusionPipeline.from_pretrained("BitDance-L-1x-diffusers")\n'), Names())


# Running the blocks ---------------------------------------------------------------------------------------------


class PageSession:
    """The namespace and working folder of one page's blocks; ``done`` is the index of the last block run."""

    def __init__(self, folder: Path):
        self.folder, self.namespace, self.done = folder, {"__name__": "__docs__"}, 0
        write_my_pictures(folder / "my_pictures")


def write_my_pictures(folder: Path):
    from bitdance_diffusers.training.shapes import ShapesDataset, render_scene

    folder.mkdir(parents=True)
    dataset = ShapesDataset(4, resolution=128, seed=0, max_objects=1)
    for index in range(len(dataset)):
        scene = dataset.scene(index)
        render_scene(scene, 128).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(scene.caption())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return ModelFolders(tmp_path_factory.mktemp("docs-models"))


@pytest.fixture(scope="module")
def sessions():
    return {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The blocks run on one thread: the small models' matrices gain nothing from a second one, and on shared cores
    the threads' waiting for each other costs ten times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def forget_compiled_code():
    """The blocks' compiled code does not outlive the module (Dynamo counts recompilations per code object)."""
    yield
    torch._dynamo.reset()


@pytest.fixture
def cpu_stand_ins(monkeypatch, eager_graphs):
    """Rule 5 of the module docstring, for one test."""
    from bitdance_diffusers import BitDanceImageNetPipeline, BitDancePipeline

    for pipeline_class in (BitDancePipeline, BitDanceImageNetPipeline):
        monkeypatch.setattr(pipeline_class, "__call__", with_few_head_steps(pipeline_class.__call__))
    compile_function = torch.compile

    def eager_compile(model=None, **options):
        options["backend"] = "eager"
        options.pop("mode", None)
        return compile_function(**options) if model is None else compile_function(model, **options)

    monkeypatch.setattr(torch, "compile", eager_compile)


def with_few_head_steps(call):
    def call_with_few_head_steps(self, *args, **kwargs):
        kwargs["num_inference_steps"] = min(kwargs.get("num_inference_steps", MAX_HEAD_STEPS), MAX_HEAD_STEPS)
        return call(self, *args, **kwargs)

    return call_with_few_head_steps


def execute(block: Block, session: PageSession, models: ModelFolders, monkeypatch):
    monkeypatch.chdir(session.folder)
    # Padded so that a traceback names the line of the Markdown page.
    code = compile("\n" * block.line + swapped(block, models), str(REPO / block.page), "exec")
    exec(code, session.namespace)


def blocks_of(page: str) -> list[Block]:
    return [block for block in PYTHON_BLOCKS if block.page == page]


@pytest.mark.parametrize(
    "block",
    [pytest.param(block, id=block.id, marks=[pytest.mark.skip(reason=block.skip)] if block.skip else [])
     for block in PYTHON_BLOCKS],
)  # fmt: skip
def test_python_block_runs(block, models, sessions, tmp_path_factory, monkeypatch, cpu_stand_ins):
    earlier = [other for other in blocks_of(block.page) if other.index < block.index and not other.skip]
    session = sessions.pop(block.page, None)
    if session is None or session.done != (earlier[-1].index if earlier else 0):
        session = PageSession(tmp_path_factory.mktemp("docs-page"))
        for other in earlier:
            try:
                execute(other, session, models, monkeypatch)
            except Exception as error:
                raise AssertionError(f"{block.id} runs after {other.id}, which fails: {error!r}") from error
    execute(block, session, models, monkeypatch)
    session.done = block.index
    sessions[block.page] = session


def test_every_page_is_collected_and_has_python_blocks():
    assert {block.page for block in PYTHON_BLOCKS} >= {"README.md", "docs/text-to-image.md", "docs/imagenet.md",
                                                       "docs/lora.md", "docs/quantization.md"}  # fmt: skip
    for path in PAGES:  # no Python hides in a fence these tests do not run
        languages = {language for language, *_ in fenced_blocks(path)}
        assert not languages & {"pycon", "python3", "ipython"}, path


def test_skipped_blocks_are_few_and_say_why():
    skipped = [block for block in PYTHON_BLOCKS if block.skip]
    listing = "\n".join(f"  {block.id} (line {block.line}): {block.skip}" for block in skipped)
    print(f"{len(skipped)} of {len(PYTHON_BLOCKS)} Python blocks are marked to skip:\n{listing}")
    assert len(skipped) <= MAX_SKIPPED_BLOCKS, listing
    for block in skipped:
        assert len(block.skip.split()) >= 3, f"{block.id}: say why it cannot run on a CPU"
        compile(block.code, block.id, "exec")  # still valid Python


# Commands -----------------------------------------------------------------------------------------------------------


def commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n", " ", code)
    found = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            found.append(words[:end])
            words = words[end + 1 :]
    return found


def without_launcher(words: list[str]) -> list[str]:
    """``accelerate launch [options] script.py ...`` -> ``python script.py ...``."""
    if words[:2] != ["accelerate", "launch"]:
        return words
    script = next(index for index, word in enumerate(words) if word.endswith(".py"))
    return ["python", *words[script:]]


class ParsedCommand(BaseException):
    """Raised right after a script's arguments parsed, before the script does anything with them."""


def parse_command(words: list[str]) -> bool:
    """Parse one documented command with its real parser; ``False`` for the commands this test does not run (other
    programs, and ``benchmarks/`` scripts). A script runs as ``__main__`` until its ``parse_args`` has parsed."""
    from bitdance_diffusers.cli import build_parser

    words = without_launcher(words)
    if words[:2] == ["bitdance", "convert"] and len(words) > 2:  # the same converter as the script
        words = ["python", f"conversion/convert_bitdance_{words[2]}.py", *words[3:]]
    if words[:1] == ["bitdance"]:
        build_parser(command=words[1] if len(words) > 1 else None).parse_args(words[1:])
        return True
    if words[:1] != ["python"] or len(words) < 2 or not words[1].startswith(("examples/", "conversion/")):
        return False
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        parse_args(parser, args, namespace)
        raise ParsedCommand()

    with pytest.MonkeyPatch.context() as patch, pytest.raises(ParsedCommand):
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", words[1:])
        patch.setattr(logging, "basicConfig", lambda **kwargs: None)  # the converter scripts' own logging set-up
        runpy.run_path(str(REPO / words[1]), run_name="__main__")
    return True


@pytest.mark.parametrize("page", sorted({block.page for block in BASH_BLOCKS}))
def test_documented_commands_parse(page):
    parsed = 0
    for block in (block for block in BASH_BLOCKS if block.page == page):
        for words in commands(block.code):
            try:
                parsed += parse_command(words)
            except SystemExit as exit:  # argparse's answer to an unknown or malformed flag
                raise AssertionError(f"{block.id}: `{shlex.join(words)}` does not parse (exit {exit.code})") from None
    if page in ("README.md", "docs/training.md", "docs/conversion.md", "docs/cli-and-demo.md"):
        assert parsed, f"{page} documents commands, and none was parsed"


@pytest.mark.parametrize(
    "words",
    [
        ["bitdance", "generate", "--prompt", "a red fox", "--stepz", "4"],
        ["python", "conversion/convert_bitdance_t2i.py", "--checkpoint_path", "src", "--dumppath", "dst"],
        ["accelerate", "launch", "--num_processes", "2", "examples/train_text_to_image_lora.py", "--output_dir", "out",
         "--ranks", "4"],
    ],
    ids=["bitdance", "converter", "training-example"],
)  # fmt: skip
def test_a_command_with_a_wrong_flag_does_not_parse(words, capsys):
    with pytest.raises(SystemExit):
        parse_command(words)
    error = capsys.readouterr().err
    assert "unrecognized arguments" in error or "required: --dump_path" in error, error


# Links --------------------------------------------------------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown page as GitHub makes them from its headings, and its ``<a id="...">`` tags."""
    text = re.sub(r"^(```|~~~).*?^\1", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    found = set(re.findall(r'<a id="([^"]+)">', text))
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda path: path.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    text = re.sub(r"^(```|~~~).*?^\1", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: the link {target} points to nothing"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: {linked.name} has no heading for #{anchor}"
