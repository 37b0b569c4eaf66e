"""The documentation stays true: README.md and docs/*.md are checked against the repository.

- The worked examples run: every ```python block marked `<!-- test -->` (the line before its fence)
  is run, in page order, in one Python process per page, in a temporary directory. A block marked
  `<!-- file: PATH -->` is the content of a new file the page tells the reader to create: it is
  written to PATH in that directory first, and a Python file under `recsys/` is imported under its
  module name (`recsys/models/mean.py` -> `recsys.models.mean`), as if it were in the package.
- Every `python train.py|evaluate.py|predict.py ...` command (in bash blocks and inline code) and
  every `make train ARGS="..."` composes with Hydra: config groups, options and keys exist. The
  configs of a page's file blocks are added to `configs/` for its commands.
- Every repository path mentioned (`recsys/...py`, `configs/...yaml`, `tests/...`, `benchmarks/...`,
  ...) exists, unless a file block of the same page creates it; every dotted `recsys.` name imports.
- Every relative markdown link resolves, `#anchors` included (GitHub's heading slugs).
- Every python block compiles and the imports of the blocks that are not run resolve; every yaml
  block parses; every table row has as many cells as its header (a `|` in code must be `\\|`).
"""

from __future__ import annotations

import ast
import glob
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
EXPECTED_PAGES = (
    "benchmarks",
    "browse_vs_buy",
    "comparing",
    "configs",
    "data",
    "extending",
    "gpus_and_clusters",
    "models",
    "protocol",
    "serving",
)
README_MAX_LINES = 300  # the README is the newcomer's page; details belong in docs/
# Top-level directories whose paths the pages mention.
PATH_PREFIXES = ("recsys", "configs", "tests", "benchmarks", "notebooks", "hydra_plugins", "data", "docs")
PATH_RE = re.compile(r"(?<![\w./$-])(?:" + "|".join(PATH_PREFIXES) + r")/[\w./*@-]*")
DOTTED_RE = re.compile(r"(?<![\w./-])recsys(?:\.\w+)+")
LINK_RE = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
MARKER_RE = re.compile(r"^<!--\s*(test|file:\s*(\S+))\s*-->$")
FENCE_RE = re.compile(r"^```(\w*)\s*$")
INLINE_CODE_RE = re.compile(r"`([^`\n]+)`")
SCRIPTS = {"train.py": "train", "evaluate.py": "evaluate", "predict.py": "predict"}

OmegaConf.register_new_resolver("project_root", lambda: str(ROOT), replace=True)


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "test", "file" or None
    path: str | None = None  # for "file"

    @property
    def label(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def split_page(page: Path) -> tuple[list[Block], str]:
    """The page's fenced blocks, and its prose (the lines outside fences)."""
    lines = page.read_text().splitlines()
    blocks, prose, fence, start, lang, body = [], [], False, 0, "", []
    for number, line in enumerate(lines, 1):
        match = FENCE_RE.match(line)
        if not fence and match:
            fence, start, lang, body = True, number, match.group(1), []
        elif fence and line.strip() == "```":
            previous = lines[start - 2].strip() if start >= 2 else ""
            marker = MARKER_RE.match(previous)
            kind = None if marker is None else ("test" if marker.group(1) == "test" else "file")
            path = marker.group(2) if marker is not None else None
            blocks.append(Block(page, start, lang, "\n".join(body) + "\n", kind, path))
            fence = False
        elif fence:
            body.append(line)
        else:
            prose.append(line)
    assert not fence, f"{page.relative_to(ROOT)}:{start}: code block never closed"
    return blocks, "\n".join(prose)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def created_paths(blocks: list[Block]) -> set[str]:
    return {b.path for b in blocks if b.marker == "file"}


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


# --- the pages ---------------------------------------------------------------------------------


def test_docs_pages_exist_and_readme_is_short():
    missing = [name for name in EXPECTED_PAGES if not (DOCS / f"{name}.md").exists()]
    assert not missing, f"docs pages missing: {missing}"
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move details into docs/ (at most {README_MAX_LINES})"
    )


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_markers_are_well_formed(page):
    """Each marker comment is one of the two forms and sits right before a code block it can mark."""
    lines = page.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip().startswith("<!--"):
            continue
        marker = MARKER_RE.match(line.strip())
        assert marker, (
            f"{page_id(page)}:{number}: unknown comment {line!r}; use <!-- test --> or <!-- file: PATH -->"
        )
        following = lines[number] if number < len(lines) else ""
        fence = FENCE_RE.match(following)
        assert fence, f"{page_id(page)}:{number}: a marker must be followed directly by a code block"
        if marker.group(1) == "test":
            assert fence.group(1) == "python", f"{page_id(page)}:{number}: only python blocks can be run"


# --- paths, names and links ----------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_mentioned_paths_exist(page):
    blocks, _ = split_page(page)
    created = created_paths(blocks)
    missing = []
    for match in PATH_RE.finditer(page.read_text()):
        path = match.group(0).rstrip(".,;:")
        if path in created:
            continue
        found = glob.glob(str(ROOT / path)) if "*" in path else (ROOT / path).exists()
        if not found:
            missing.append(path)
    assert not missing, f"{page_id(page)} mentions paths that do not exist: {sorted(set(missing))}"


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_dotted_names_import(page):
    blocks, _ = split_page(page)
    new_modules = {module_name(p) for p in created_paths(blocks) if p.endswith(".py")}
    defined = set()  # classes and functions the page's own blocks define
    for block in blocks:
        if block.lang == "python":
            defined |= {
                node.name
                for node in ast.walk(ast.parse(block.code))
                if isinstance(node, ast.ClassDef | ast.FunctionDef)
            }
    unresolved = []
    for name in set(DOTTED_RE.findall(page.read_text())):
        if any(name == m or name.startswith(m + ".") for m in new_modules):
            continue
        if name.rsplit(".", 1)[-1] in defined:
            continue
        if not _resolves(name):
            unresolved.append(name)
    assert not unresolved, f"{page_id(page)}: names that do not import: {sorted(unresolved)}"


def github_slugs(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    slugs, seen = set(), {}
    fence = False
    for line in page.read_text().splitlines():
        if FENCE_RE.match(line) or line.strip() == "```":
            fence = not fence
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if fence or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page):
    _, prose = split_page(page)
    broken = []
    for target in LINK_RE.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in github_slugs(file):
            broken.append(target)
    assert not broken, f"{page_id(page)}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_tables_have_as_many_cells_as_their_header(page):
    _, prose = split_page(page)
    bad, header = [], None
    for line in prose.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line.strip().strip("|")))
        if header is None:
            header = cells
        elif cells != header:
            bad.append(line[:80])
    assert not bad, (
        f"{page_id(page)}: table rows with a wrong number of cells (escape | in code as \\|): {bad}"
    )


# --- code blocks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_code_blocks_parse(page):
    blocks, _ = split_page(page)
    for block in blocks:
        if block.lang == "python":
            tree = compile(block.code, block.label, "exec", flags=ast.PyCF_ONLY_AST)
            if block.marker is None:  # not run: its imports must still resolve
                imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
                exec(compile(ast.Module(body=imports, type_ignores=[]), block.label, "exec"), {})
        elif block.lang == "yaml":
            yaml.safe_load(block.code)


def commands(page: Path, blocks: list[Block], prose: str) -> list[tuple[str, str, str]]:
    """(where, config name, argument string) of every train/evaluate/predict command."""
    found = []

    def scan(text: str, where: str) -> None:
        text = re.sub(r"\\\n\s*", " ", text)
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)  # a shell comment
            for match in re.finditer(
                r"(?:^|\s)python ([\w/]*?(train|evaluate|predict)\.py)((?:\s+[^\s|;&]+)*)", line
            ):
                if Path(match.group(1)).name in SCRIPTS:
                    found.append((where, SCRIPTS[Path(match.group(1)).name], match.group(3)))
            for match in re.finditer(r"make train ARGS=\"([^\"]*)\"", line):
                found.append((where, "train", match.group(1)))

    for block in blocks:
        if block.lang in ("bash", "sh", ""):
            scan(block.code, block.label)
    for code in INLINE_CODE_RE.findall(prose):
        scan(code, f"{page_id(page)} (inline)")
    return found


def overrides_of(arguments: str) -> list[str]:
    """The overrides of a command line, placeholders (`<run>`, `...`) made plain values; an override
    whose whole value is a placeholder (`experiment=<preset>`) is left out: it names no option."""
    arguments = re.sub(r"(\S+)=<[^>]*>(?=\s|$)", "", arguments)
    arguments = re.sub(r"<[^>]*>", "X", arguments).replace("[...]", "[X]").replace("...", "X")
    tokens = iter(shlex.split(arguments))
    overrides = []
    for token in tokens:
        if token in ("-p", "--package", "--cfg", "-c", "--config-name", "-cn"):
            next(tokens, None)
        elif "=" in token and not token.startswith("-"):
            overrides.append(token)
    return overrides


def compose_command(config_dir: Path, config: str, overrides: list[str]) -> None:
    """Compose as Hydra would for the command; a sweep's first value stands for the sweep."""
    plain, searched = [], []
    for override, text in zip(OverridesParser.create().parse_overrides(overrides), overrides):
        if override.is_discrete_sweep() and override.value_type != ValueType.GLOB_CHOICE_SWEEP:
            plain.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
        elif override.is_sweep_override():
            searched.append(override.key_or_group)
        else:
            plain.append(text)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config, overrides=plain, return_hydra_config=True)
    for key in searched:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"no key {key}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_commands_compose(page, tmp_path):
    blocks, prose = split_page(page)
    config_dir = ROOT / "configs"
    new_configs = [b for b in blocks if b.marker == "file" and b.path.startswith("configs/")]
    if new_configs:
        config_dir = tmp_path / "configs"
        shutil.copytree(ROOT / "configs", config_dir)
        for block in new_configs:
            (tmp_path / block.path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / block.path).write_text(block.code)
    failures = []
    for where, config, arguments in commands(page, blocks, prose):
        try:
            compose_command(config_dir, config, overrides_of(arguments))
        except Exception as err:  # noqa: BLE001 - every failure is reported with its command
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            failures.append(f"{where}: {config}.py{arguments}\n    {first_line}")
    assert not failures, "commands that do not compose:\n" + "\n".join(failures)


# --- the worked examples --------------------------------------------------------------------------

DRIVER = r"""
import importlib, importlib.util, json, runpy, sys
spec = json.load(open(sys.argv[1]))
for name, path in spec["modules"]:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    setattr(importlib.import_module(parent), child, module)
for label, path in spec["blocks"]:
    print(f"=== running {label}", flush=True)
    runpy.run_path(path, run_name="__main__")
"""

RUN_PAGES = [page for page in PAGES if any(b.marker == "test" for b in split_page(page)[0])]


@pytest.mark.parametrize("page", RUN_PAGES, ids=page_id)
def test_worked_examples_run(page, tmp_path):
    blocks, _ = split_page(page)
    modules, runs = [], []
    for index, block in enumerate(blocks):
        if block.marker == "file" and block.path.endswith(".py"):
            file = tmp_path / "_modules" / f"{module_name(block.path)}.py"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(block.code)
            modules.append((module_name(block.path), str(file)))
        elif block.marker == "file":
            (tmp_path / block.path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / block.path).write_text(block.code)
        elif block.marker == "test":
            file = tmp_path / "_blocks" / f"block_{index}.py"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(block.code)
            runs.append((block.label, str(file)))
    spec = tmp_path / "_blocks" / "spec.json"
    spec.write_text(json.dumps({"modules": modules, "blocks": runs}))
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"a worked example of {page_id(page)} failed (the last '=== running' line names it):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    assert result.stdout.count("=== running") == len(runs)
