"""Tier: unit (static; no Docker engine on development machines). What the Dockerfile promises:
a base image pinned by tag, every runtime requirement installed, the image's torch never replaced,
the package installed, a non-root user, no HEALTHCHECK, and the CLI help as default command."""

import re

from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
INSTRUCTIONS = [line.strip() for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def _instr(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in INSTRUCTIONS if line.split()[0].upper() == name]


def _requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not pinned with =="
            pins[name.lower()] = version
    return pins


def test_base_image_is_ngc_pytorch_pinned_by_tag():
    (base,) = _instr("FROM")
    image, _, tag = base.partition(":")
    assert image == "nvcr.io/nvidia/pytorch"
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag), f"base image tag {tag!r} is not a fixed release"


def test_every_requirement_installed_and_torch_kept():
    run = " && ".join(_instr("RUN"))
    pins = _requirements()
    assert {"torch", "megatron-core", "sentencepiece", "sacrebleu", "numpy", "psutil"} <= set(pins)
    assert pins["megatron-core"] == "0.16.1"
    # requirements.txt is copied and installed, minus exactly the image-provided torch and numpy
    assert "requirements.txt" in _instr("COPY")[0]
    assert "grep -vE '^(torch|numpy)==' requirements.txt" in run
    assert "-r /tmp/requirements-image.txt" in run
    # ... under a constraint that pins the image's own torch, so nothing can reinstall it
    assert "grep -iE '^(torch|numpy)=='" in run and "-c /tmp/image-constraints.txt" in run
    for command in re.split(r"&&|;", run):
        words = command.split()
        if "install" in words:
            named = [w for w in words[words.index("install") + 1:] if not w.startswith("-")
                     and not w.startswith("/tmp/")]
            assert not any(re.match(r"^(torch|nvidia-)", w) for w in named), command


def test_package_installed_non_root_and_help_by_default():
    run = " && ".join(_instr("RUN"))
    assert re.search(r"pip install .*--no-deps .*\.(\s|$)", run), "the package itself is installed"
    copied = " ".join(_instr("COPY"))
    for path in ("megatron_moe", "examples", "tools"):
        assert path in copied
    users = _instr("USER")
    assert users and users[-1] not in ("root", "0")
    assert not _instr("HEALTHCHECK")
    assert _instr("CMD") == ['["python", "-m", "megatron_moe", "--help"]']
