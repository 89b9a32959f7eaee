"""The README as a reader meets it: its Python examples run as written, and ``make lab``
opens JupyterLab on the notebooks with this environment as their kernel.

Every ```python block of README.md runs, in order, in one fresh Python process started in an
empty folder, the blocks sharing one namespace as cells of one notebook do. A block that
uses a name an earlier block did not define, a file it did not write, or an API that has
changed fails here with the README's own line number in the traceback.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks() -> list[tuple[int, str]]:
    """(first line in README.md, source) of every ```python block, in order."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def script_of(blocks: list[tuple[int, str]]) -> str:
    """One program running the blocks in turn in its own globals, each compiled at its
    README line so that tracebacks point into README.md, with a line after each."""
    lines = []
    for i, (line, source) in enumerate(blocks):
        padded = "\n" * (line - 1) + source
        lines.append(f"exec(compile({padded!r}, {str(README)!r}, 'exec'), globals())")
        lines.append(f"print('README block {i} ran', flush=True)")
    return "\n".join(lines) + "\n"


def free_names(source: str) -> set[str]:
    """Names a block reads but never binds itself (imports, assignments, definitions,
    arguments, loop and comprehension variables), builtins aside."""
    tree = ast.parse(source)
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound


def test_each_example_says_where_its_data_come_from():
    """Every block binds every name it uses (its data included), so each can also be
    pasted alone into a fresh notebook; none relies on an ``x`` an earlier block left."""
    blocks = python_blocks()
    assert len(blocks) >= 7
    for line, source in blocks:
        assert not free_names(source), f"README.md line {line}: {sorted(free_names(source))}"


def test_every_python_block_runs_as_written_in_a_fresh_process(tmp_path):
    blocks = python_blocks()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELBOLAB")}
    # small problems: one thread each is as fast, and unaffected by a busy machine
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    run = subprocess.run(
        [sys.executable, "-c", script_of(blocks)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-6000:]}"
    ran = re.findall(r"^README block (\d+) ran$", run.stdout, re.M)
    assert ran == [str(i) for i in range(len(blocks))]
    # what the examples print is what the README shows beside them
    assert "scheme       estimate" in run.stdout and "nuts" in run.stdout
    assert "K  scheme" in run.stdout
    # and the only files they leave are the ones they write themselves
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/vae.pt", "x.npy"]


def test_make_lab_opens_the_notebooks_with_this_environment():
    makefile = (ROOT / "Makefile").read_text()
    header = makefile.splitlines()[0]
    assert header.startswith("#") and "lab" in header.split("--")[0]
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    assert "lab" in phony
    recipe = re.search(r"^lab: \$\(STAMP\)\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "the lab target installs into .venv first, like the others"
    commands = recipe.group(1)
    assert "$(BIN)/jupyter lab" in commands and "--notebook-dir=notebooks" in commands
    if shutil.which("make"):
        dry = subprocess.run(
            ["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        assert ".venv/bin/jupyter lab --notebook-dir=notebooks" in dry.stdout
    # that jupyter is this environment's, and so is the notebooks' kernel, python3
    assert Path(sys.prefix, "bin", "jupyter-lab").exists()
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.resource_dir).resolve().is_relative_to(Path(sys.prefix).resolve())
    assert spec.argv[0] in ("python", "python3", sys.executable)


def test_tqdm_draws_notebook_bars():
    """With ipywidgets installed, tqdm.auto (the progress bars of EM and SVITrainer) draws
    a widget in a notebook instead of warning "IProgress not found"."""
    import ipywidgets
    import tqdm.notebook

    assert tqdm.notebook.IProgress is ipywidgets.FloatProgress
    bar = tqdm.notebook.tqdm(total=4, display=False)
    bar.update(1)
    bar.refresh()
    (progress,) = [w for w in bar.container.children if isinstance(w, ipywidgets.FloatProgress)]
    assert progress.max == 4 and progress.value == 1
    bar.close()
