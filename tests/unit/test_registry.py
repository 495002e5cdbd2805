"""Registry loading: valid files become frozen entries; every bad input is reported with file:line."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import keys, registry
from hpc_kernels.errors import RegistryError, UnknownKernelError

RECIPE = {"a.def": "Bootstrap: localimage\nFrom: base.sif\n"}


def problems(make_registry: Any, text: str, files: dict[str, str] | None = None) -> list[str]:
    path = make_registry(text, RECIPE if files is None else files)
    with pytest.raises(RegistryError) as info:
        registry.load_file(path)
    return list(info.value.problems)


def test_valid_registry_applies_defaults(make_registry: Any) -> None:
    path = make_registry(
        """
        defaults:
          images_dir: imgs
          binds: [/project]
          gpu: none
        kernels:
          science:
            def: a.def
            env: {OMP_NUM_THREADS: 4}
            pass_env: [MY_*]
          other:
            image: /abs/other.sif
            mode: instance
            display_name: Other one
        """,
        RECIPE,
    )
    reg = registry.load_file(path)
    sci, other = reg.kernels
    assert sci.name == "science"
    assert sci.recipe == path.parent / "a.def"
    assert sci.image == path.parent / "imgs" / "science.sif"
    assert sci.binds == ("/project",)
    assert sci.gpu == "none"
    assert sci.env_dict == {"OMP_NUM_THREADS": "4"}
    assert sci.display_name == "Python (science)"
    assert sci.command == keys.DEFAULT_COMMAND
    assert sci.interrupt_mode == "signal"
    assert other.image == Path("/abs/other.sif")
    assert other.interrupt_mode == "message"  # exec instance:// does not survive SIGINT
    with pytest.raises(dataclasses.FrozenInstanceError):
        sci.name = "x"  # type: ignore[misc]


def test_all_problems_reported_at_once_with_lines(make_registry: Any) -> None:
    found = problems(
        make_registry,
        """\
        defaults:
          gpu: maybe
        kernels:
          Bad_Name:
            def: a.def
          good:
            def: missing.def
            colour: blue
          typed:
            def: a.def
            binds: /project
          good:
            image: /x.sif
        """,
    )
    text = "\n".join(found)
    assert ":2: 'gpu' in defaults must be one of auto, nvidia, rocm, none, not 'maybe'." in text
    assert ":4: kernel name 'Bad_Name' is not valid" in text
    assert ":7: recipe 'missing.def' of kernel 'good' not found" in text
    assert ":8: unknown key 'colour' in kernel 'good'" in text
    assert ":11: 'binds' in kernel 'typed' must be a list" in text
    assert ":12: duplicate kernel name 'good'." in text
    assert text.count("'gpu' in defaults") == 1  # reported once, not once per kernel
    lines = [int(p.split(":")[1]) for p in found]
    assert lines == sorted(lines)


def test_unknown_key_suggests_the_right_one(make_registry: Any) -> None:
    (msg,) = problems(make_registry, "kernels:\n  k:\n    def: a.def\n    bind: [/x]\n")
    assert "did you mean 'binds'?" in msg


def test_malformed_yaml_names_the_line(make_registry: Any) -> None:
    (msg,) = problems(make_registry, "kernels:\n  k:\n    def: [a.def\n  other: 1\n")
    assert "not valid YAML" in msg and "kernels.yaml:" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- just\n- a list\n", "must be a mapping with 'kernels:'"),
        ("kernels: [a, b]\n", "'kernels' must be a mapping"),
        ("kernels:\n  k: 3\n", "kernel 'k' must be a mapping"),
        ("kernels:\n  k: {}\n", "needs 'def'"),
        ("kernels:\n  k:\n    def: a.def\n    command: [python]\n", "must contain the argument '{connection_file}'"),
        ("kernels:\n  k:\n    def: a.def\n    mode: daemon\n", "'mode' in kernel 'k' must be one of exec, instance"),
        ("kernels:\n  k:\n    def: a.def\n    env: {1BAD: x}\n", "environment variable name '1BAD'"),
        ("kernels:\n  k:\n    def: a.def\n    idle_timeout: -1\n", "'idle_timeout'"),
        ("kernels:\n  k:\n    def: a.def\n    fakeroot: yes please\n", "'fakeroot' in kernel 'k' must be true or false"),
        ("nope: 1\nkernels: {}\n", "unknown top-level key 'nope'"),
    ],
)
def test_bad_values(make_registry: Any, text: str, expected: str) -> None:
    assert any(expected in p for p in problems(make_registry, text))


def test_missing_file_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(RegistryError) as info:
        registry.load_file(tmp_path / "nope.yaml")
    assert "registry file not found" in str(info.value)


def test_locate_order(make_registry: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> None:
    with pytest.raises(RegistryError, match="no registry found"):
        registry.locate()
    user = isolated_home / ".config" / "hpc-kernels" / "kernels.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("kernels: {}\n")
    assert registry.locate() == (user, "user config")
    here = isolated_home / "kernels.yaml"
    here.write_text("kernels: {}\n")
    assert registry.locate() == (here, "./kernels.yaml")
    env = make_registry("kernels: {}\n")
    monkeypatch.setenv("HPC_KERNELS_REGISTRY", str(env))
    assert registry.locate() == (env, "$HPC_KERNELS_REGISTRY")
    assert registry.locate("other.yaml")[1] == "--registry"


def test_unknown_kernel_names_known_ones(make_registry: Any) -> None:
    reg = registry.load_file(make_registry("kernels:\n  sci:\n    def: a.def\n", RECIPE))
    with pytest.raises(UnknownKernelError, match=r"no kernel named 'nope' .*known: sci"):
        reg.get("nope")


def test_yaml_booleans_are_explained(make_registry: Any) -> None:
    (msg,) = problems(make_registry, "kernels:\n  k:\n    def: a.def\n    gpu: yes\n")
    assert "not true (YAML reads yes/no/on/off as true/false: quote the word)" in msg


@pytest.mark.parametrize(
    ("content", "line", "expected"),
    [
        # Latin-1 (an editor's default on some systems): é is the single byte 0xe9.
        ("kernels:\n  k:\n    def: a.def\n    display_name: Caf\xe9\n".encode("latin-1"), 4,
         "not UTF-8 text (byte 0xe9 at column 22): save it as UTF-8"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00\xff\xfe binary", 1, "looks like a binary file"),
        ("\ufeffkernels: {}\n".encode("utf-16"), 1, "not UTF-8 text (byte 0xff at column 1)"),
        (b"kernels:\n  k:\n    def: a\x07.def\n", 3, "not valid YAML: special characters are not allowed"),
    ],
)
def test_a_registry_that_is_not_text_is_one_sentence_with_its_line(
        tmp_path: Path, content: bytes, line: int, expected: str) -> None:
    path = tmp_path / "kernels.yaml"
    path.write_bytes(content)
    with pytest.raises(RegistryError) as info:
        registry.load_file(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:{line}: ") and expected in problem


def test_an_env_value_with_a_lone_surrogate_is_one_sentence(make_registry: Any) -> None:
    """JSON-style escapes of an emoji ("\\ud83d\\ude42") reach PyYAML as two lone halves, which no process can be
    given: refused at load with the fix, not a UnicodeEncodeError at launch."""
    path = make_registry('kernels:\n  k:\n    image: /x.sif\n    env: {X: "a\\ud83d\\ude42"}\n')
    with pytest.raises(registry.RegistryError, match="lone UTF-16 surrogate"):
        registry.load(path)
