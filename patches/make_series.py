"""Build the upstream patch series for mlx-lm from this package's sources.

    python patches/make_series.py [--mlx-lm-src DIR] [--out DIR] [--check] [--lint]

It copies the pristine tree of the mlx-lm 0.32.2 source distribution
(downloaded with pip into a cache directory unless ``--mlx-lm-src`` names an
unpacked one) into a temporary git repository, applies each patch of
``patches/src/p000N_*.py`` (anchored edits to upstream files, and for 0002
our model and strategy files with their imports made relative), commits it
with a fixed author and date, and writes ``git format-patch`` output to
``patches/``. It also writes the patch sizes into ``patches/README.md``.

``--check`` writes nothing: it exits 1 if the committed series or the sizes
in the README differ from what it would write. ``--lint`` runs upstream's
formatters and linter (black 25.1.0, isort 6.0.0 --profile=black, and ruff
if installed) on the files each patch changes, in the patched tree.
"""

import argparse
import difflib
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT / "patches"
SRC = PATCHES / "src"
README = PATCHES / "README.md"

MLX_LM_VERSION = "0.32.2"
SDIST = f"mlx_lm-{MLX_LM_VERSION}.tar.gz"
SDIST_SHA256 = "1af8a92f6a141c3e2bf5b0369ac4464203a8e2189c47b9e40d3e921e5b3a1fe9"

AUTHOR = ("mlx-lm-llada", "mlx-lm-llada@example.invalid")
DATE = "2026-01-01T00:00:00+00:00"
GIT_ENV = {
    "GIT_AUTHOR_NAME": AUTHOR[0],
    "GIT_AUTHOR_EMAIL": AUTHOR[1],
    "GIT_AUTHOR_DATE": DATE,
    "GIT_COMMITTER_NAME": AUTHOR[0],
    "GIT_COMMITTER_EMAIL": AUTHOR[1],
    "GIT_COMMITTER_DATE": DATE,
    # No user or system configuration: the output depends on the inputs only.
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "LC_ALL": "C",
}
GIT_CONFIG = [
    *("-c", "core.abbrev=12"),
    *("-c", "diff.algorithm=myers"),
    *("-c", "diff.indentHeuristic=true"),
    *("-c", "init.defaultBranch=main"),
]
TOOLS = {"black": "25.1.0", "isort": "6.0.0"}
SIZES_BEGIN = "<!-- sizes: written by make_series.py -->"
SIZES_END = "<!-- end of sizes -->"


class SeriesError(Exception):
    pass


class DownloadError(SeriesError):
    pass


# ---------------------------------------------------------------- the sdist


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-lm-llada"


def fetch_sdist(dest: Path, cache: Path = None) -> Path:
    """Unpack the pristine sdist into ``dest``; return its tree.

    The archive is downloaded with pip into ``cache`` once, and checked
    against its sha256 each time.
    """
    cache = cache or cache_dir()
    archive = cache / SDIST
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        pip = subprocess.run(
            [
                *(sys.executable, "-m", "pip", "download", "--no-deps"),
                *("--no-binary", ":all:", "--dest", str(cache)),
                f"mlx-lm=={MLX_LM_VERSION}",
            ],
            capture_output=True,
            text=True,
        )
        if pip.returncode or not archive.exists():
            raise DownloadError(
                f"pip download mlx-lm=={MLX_LM_VERSION} failed:\n"
                + pip.stdout[-2000:]
                + pip.stderr[-2000:]
            )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SeriesError(f"{archive}: sha256 {digest}, expected {SDIST_SHA256}")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            tar.extractall(dest)
    return Path(dest) / f"mlx_lm-{MLX_LM_VERSION}"


# ------------------------------------------------------------- the patches


def load_patch_modules():
    sys.path.insert(0, str(ROOT))  # p0003 reads mlx_lm_llada.cli's flags
    modules = []
    for path in sorted(SRC.glob("p[0-9][0-9][0-9][0-9]_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    if not modules:
        raise SeriesError(f"no patch sources in {SRC}")
    return modules


def apply_edit(tree: Path, patch: str, edit):
    path, how, anchor, text = edit
    file = tree / path
    content = file.read_text(encoding="utf-8")
    count = content.count(anchor)
    if count != 1:
        first = anchor.strip().splitlines()[0]
        raise SeriesError(
            f"{patch}: the anchor {first!r}... occurs {count} times in {path} "
            "(expected once): upstream or the edit changed; update the edit"
        )
    new = {"replace": text, "before": text + anchor, "after": anchor + text}[how]
    file.write_text(content.replace(anchor, new), encoding="utf-8")


_IMPORT = re.compile(r"^(\s*)(from\s+(\S+)\s+import\s|import\s+(\S+))")


def _relative(module: str, package: str) -> str:
    """``module`` (absolute, inside mlx_lm) as seen from ``package``."""
    here, target = package.split("."), module.split(".")
    common = 0
    while common < min(len(here), len(target)) and here[common] == target[common]:
        common += 1
    if common == 0:
        raise SeriesError(f"{module} is not inside mlx_lm")
    # A package itself (``from mlx_lm.models import qwen2`` inside
    # mlx_lm.models) becomes dots alone: ``from . import qwen2``.
    return "." * (len(here) - common + 1) + ".".join(target[common:])


def upstream_imports(text: str, package: str, renames: dict, name: str) -> str:
    """Our imports of mlx-lm and of our own modules, made relative to
    ``package``; the top-level import block is regrouped as isort would."""
    lines = text.splitlines(keepends=True)
    changed_top = False
    for i, line in enumerate(lines):
        m = _IMPORT.match(line)
        if not m:
            continue
        indent, module = m.group(1), m.group(3) or m.group(4)
        root = module.split(".")[0]
        if root not in ("mlx_lm", "mlx_lm_llada") and not module.startswith("."):
            continue
        if module.startswith("."):
            continue  # inside a new package, which moves as a whole
        if m.group(4):
            raise SeriesError(
                f"{name}:{i + 1}: {line.strip()!r}: use 'from <absolute> import'"
            )
        if root == "mlx_lm_llada":
            if module not in renames:
                raise SeriesError(
                    f"{name}:{i + 1}: imports {module}, which is not upstream"
                )
            target = renames[module]
        else:
            target = module
        new = _relative(target, package)
        lines[i] = line.replace(f"from {module} import", f"from {new} import", 1)
        changed_top |= indent == ""
    text = "".join(lines)
    return _regroup_imports(text, name) if changed_top else text


def _regroup_imports(text: str, name: str) -> str:
    """Sort the top-level import block into isort's (profile black) sections."""
    lines = text.splitlines(keepends=True)
    # The block: from the first top-level import to the last one before code.
    start = next(i for i, ln in enumerate(lines) if _IMPORT.match(ln) and ln[0] != " ")
    statements, i, end = [], start, start
    while i < len(lines):
        line = lines[i]
        if line.strip() == "":
            i += 1
            continue
        if not _IMPORT.match(line) or line[0] == " ":
            break
        stmt = [line]
        if line.rstrip().endswith("("):
            while not lines[i].rstrip().endswith(")"):
                i += 1
                stmt.append(lines[i])
        statements.append("".join(stmt))
        i += 1
        end = i
    if any(ln.lstrip().startswith("#") for ln in lines[start:end]):
        raise SeriesError(f"{name}: a comment in the import block; cannot regroup")

    def section(stmt):
        module = _IMPORT.match(stmt).group(3) or _IMPORT.match(stmt).group(4)
        if module.startswith("."):
            return 3
        if module == "__future__":
            return 0
        return 1 if module.split(".")[0] in sys.stdlib_module_names else 2

    def key(stmt):
        m = _IMPORT.match(stmt)
        module = m.group(3) or m.group(4)
        dots = len(module) - len(module.lstrip("."))
        return (m.group(3) is not None, -dots, module.lstrip(".").lower())

    groups = {}
    for stmt in statements:
        groups.setdefault(section(stmt), []).append(stmt)
    block = "\n".join(
        "".join(sorted(groups[s], key=key)) for s in sorted(groups) if groups[s]
    )
    return "".join(lines[:start]) + block + "".join(lines[end:])


def new_files(tree: Path, module, renames: dict):
    """Copy the module's ``NEW_FILES``; ``renames`` (our module -> upstream
    module) gathers those of the earlier patches, which later ones import."""
    for dest, source, _ in getattr(module, "NEW_FILES", []):
        our = source[: -len(".py")].replace("/", ".").removesuffix(".__init__")
        renames[our] = dest[: -len(".py")].replace("/", ".").removesuffix(".__init__")
    for dest, source, package in getattr(module, "NEW_FILES", []):
        text = (ROOT / source).read_text(encoding="utf-8")
        if package is not None:
            text = upstream_imports(text, package, renames, source)
        if re.search(r"^\s*(from|import)\s+mlx_lm_llada\b", text, re.M):
            raise SeriesError(f"{source}: still imports mlx_lm_llada")
        (tree / dest).parent.mkdir(parents=True, exist_ok=True)
        (tree / dest).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------- git


def git(repo: Path, *args, capture=False, check=True):
    """Run git in ``repo``; with ``check=False``, None if it fails."""
    env = {**os.environ, **GIT_ENV}
    result = subprocess.run(
        ["git", *GIT_CONFIG, *args],
        cwd=repo,
        env=env,
        check=check,
        text=True,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=None if check else subprocess.DEVNULL,
    )
    if result.returncode:
        return None
    return result.stdout


def _linters():
    import importlib.metadata as md

    for tool, version in TOOLS.items():
        try:
            found = md.version(tool)
        except md.PackageNotFoundError:
            found = None
        if found != version:
            raise SeriesError(f"--lint needs {tool}=={version} (found {found})")
    linters = {
        "black": [sys.executable, "-m", "black", "--check", "--diff", "--quiet"],
        "isort": [sys.executable, "-m", "isort", "--profile=black", "--check-only"],
    }
    linters["isort"].append("--diff")
    if shutil.which("ruff"):
        linters["ruff"] = ["ruff", "check", "--no-cache", "--output-format=concise"]
    else:
        print("  (ruff not found: not run)")
    return linters


def _findings(tree: Path, linter, files):
    """What a linter reports on ``files``, as lines without file names."""
    result = subprocess.run([*linter, *files], cwd=tree, capture_output=True, text=True)
    if result.returncode == 0:
        return []
    if linter[0] == "ruff":
        return [
            line.split(": ", 1)[1]
            for line in result.stdout.splitlines()
            if line.startswith(tuple(files)) and ": " in line
        ]
    found = [
        line
        for line in result.stdout.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    return found or [result.stdout + result.stderr]


def lint(tree: Path, files, patch: str):
    """Upstream's black, isort and ruff on the changed Python files.

    A few upstream files do not pass black 25.1.0 as released; a patch must
    not add findings: a changed file is compared with its previous version.
    """
    python = [f for f in files if f.endswith(".py")]
    for name, linter in _linters().items():
        if not python or not _findings(tree, linter, python):
            continue
        for file in python:
            after = _findings(tree, linter, [file])
            if not after:
                continue
            before = []
            old = git(tree, "show", f"HEAD:{file}", capture=True, check=False)
            if old is not None:
                copy = f"{file[:-3]}_before_patch.py"
                (tree / copy).write_text(old, encoding="utf-8")
                try:
                    before = _findings(tree, linter, [copy])
                finally:
                    (tree / copy).unlink()
            new = list((Counter(after) - Counter(before)).elements())
            if new:
                raise SeriesError(f"{patch}: {name} on {file}:\n" + "\n".join(new))


def build(pristine: Path, out: Path, do_lint=False):
    """Write the series into ``out``; return its sizes (see ``_sizes``)."""
    modules = load_patch_modules()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "mlx-lm"
        shutil.copytree(
            pristine,
            repo,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"),
        )
        git(repo, "init", "--quiet")
        git(repo, "add", "--all")
        git(repo, "commit", "--quiet", "--no-verify", "-m", f"mlx-lm {MLX_LM_VERSION}")
        renames = {}
        for module in modules:
            name = module.__name__
            new_files(repo, module, renames)
            for edit in module.EDITS:
                apply_edit(repo, name, edit)
            git(repo, "add", "--all")
            if do_lint:
                changed = git(repo, "diff", "--cached", "--name-only", capture=True)
                lint(repo, changed.split(), name)
                print(f"  {name}: lint passed")
            message = f"{module.SUBJECT}\n\n{module.BODY}"
            git(repo, "commit", "--quiet", "--no-verify", "-m", message)
        out.mkdir(parents=True, exist_ok=True)
        n = len(modules)
        written = git(
            repo,
            "format-patch",
            "--no-signature",
            "--zero-commit",
            "--no-thread",
            "--subject-prefix=PATCH",
            "--output-directory",
            str(out),
            f"HEAD~{n}",
            capture=True,
        ).split()
        sizes = []
        for k, path in enumerate(written):
            numstat = git(
                repo,
                "diff",
                "--numstat",
                f"HEAD~{n - k}",
                f"HEAD~{n - k - 1}",
                capture=True,
            )
            rows = [row.split("\t", 2) for row in numstat.splitlines()]
            sizes.append(
                (
                    Path(path).name,
                    len(rows),
                    sum(int(a) for a, _, _ in rows),
                    sum(int(r) for _, r, _ in rows),
                    sum(int(a) for a, _, f in rows if f.startswith("tests/")),
                )
            )
    first = out / sizes[0][0]
    text = first.read_text(encoding="utf-8").split("\n", 2)[2]  # not From:
    if "llada" in text.lower():
        raise SeriesError(f"{first.name} names LLaDA: 0001 must stay generic")
    return sizes


def sizes_table(sizes) -> str:
    rows = [
        SIZES_BEGIN,
        "| patch | files | lines added | lines removed | added in tests/ |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, files, added, removed, tests in sizes:
        rows.append(f"| `{name}` | {files} | {added} | {removed} | {tests} |")
    return "\n".join(rows + [SIZES_END])


def _readme_with(sizes) -> str:
    text = README.read_text(encoding="utf-8")
    block = re.compile(re.escape(SIZES_BEGIN) + ".*?" + re.escape(SIZES_END), re.S)
    if not block.search(text):
        raise SeriesError(f"{README} has no sizes block ({SIZES_BEGIN})")
    return block.sub(lambda _: sizes_table(sizes), text)


def _patch_files(folder: Path):
    return {p.name: p for p in folder.glob("[0-9][0-9][0-9][0-9]-*.patch")}


def check(written: Path, committed: Path, sizes) -> int:
    new, old = _patch_files(written), _patch_files(committed)
    problems = []
    for name in sorted(set(new) | set(old)):
        if name not in old:
            problems.append(f"missing: {committed / name}")
        elif name not in new:
            problems.append(f"stale: {committed / name}")
        elif new[name].read_bytes() != old[name].read_bytes():
            diff = difflib.unified_diff(
                old[name].read_text().splitlines(),
                new[name].read_text().splitlines(),
                f"committed/{name}",
                f"sources/{name}",
                lineterm="",
            )
            problems.append("\n".join(list(diff)[:60]))
    if committed == PATCHES and _readme_with(sizes) != README.read_text("utf-8"):
        problems.append(f"the sizes in {README} are out of date")
    for problem in problems:
        print(problem)
    if problems:
        print("The series is out of date: run python patches/make_series.py")
        return 1
    print("The series is up to date.")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--mlx-lm-src",
        type=Path,
        help="the unpacked mlx-lm 0.32.2 sdist (default: download it with pip)",
    )
    parser.add_argument(
        "--out", type=Path, default=PATCHES, help="where the patches go or are"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the series is out of date"
    )
    parser.add_argument(
        "--lint", action="store_true", help="run black, isort and ruff on each patch"
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            written = Path(tmp) / "series"
            pristine = args.mlx_lm_src or fetch_sdist(Path(tmp))
            if not (pristine / "mlx_lm" / "generate.py").is_file():
                raise SeriesError(f"{pristine} is not an unpacked mlx-lm sdist")
            sizes = build(pristine, written, args.lint)
            if args.check:
                return check(written, out, sizes)
            out.mkdir(parents=True, exist_ok=True)
            for stale in _patch_files(out).values():
                stale.unlink()
            for name, path in _patch_files(written).items():
                shutil.copyfile(path, out / name)
        if out == PATCHES:
            README.write_text(_readme_with(sizes), encoding="utf-8")
    except (SeriesError, subprocess.CalledProcessError) as e:
        print(f"make_series.py: {e}", file=sys.stderr)
        return 2
    print(sizes_table(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
