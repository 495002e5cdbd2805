"""Staging, generated and derived recipes, requirement files, image references and labels, without real
components: the registry's new keys, the recipes hpc-kernels writes (as text), what a recipe needs, pip's
failures as sentences, a registry's answers (a fake one on loopback), and builds with a fake builder.
The real proofs (a Slurm job on the compute node without internet, a loopback container registry, pip) are in
tests/real/test_staging.py.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hpc_kernels import cli, oci, registry
from hpc_kernels.build import orchestrator, recipegen, stamps
from hpc_kernels.build.derive import derive
from hpc_kernels.errors import BuildError, RegistryError
from hpc_kernels.model import Fetch, Staging
from hpc_kernels.staging import cache, inputs, needs, requirements, wheelhouse
from tests.helpers.builders import FakeBuilder

ROOT = Path(__file__).resolve().parents[2]


def problems(path: Path) -> list[str]:
    with pytest.raises(RegistryError) as info:
        registry.load_file(path)
    return list(info.value.problems)


# ----------------------------------------------------------------------------- the registry's keys


def test_python_and_requirements_make_a_buildable_kernel(make_registry: Any) -> None:
    path = make_registry('kernels:\n  ana:\n    python: "3.12"\n    requirements: req.txt\n', {"req.txt": "six\n"})
    (entry,) = registry.load_file(path).kernels
    assert entry.buildable and entry.recipe is None and entry.python == "3.12"
    assert entry.requirements == path.parent / "req.txt" and entry.staging is Staging.AUTO
    assert entry.lock == path.parent / "kernels.locks" / "ana.txt"
    assert "Bootstrap: docker\nFrom: python:3.12-slim\n" in recipegen.generate(entry)


@pytest.mark.parametrize(("body", "files", "needle"), [
    ("    python: 3.10\n", {}, "'python' of kernel 'k' must be a quoted version such as \"3.12\" (YAML reads 3.1 "),
    ("    python: \"2.7\"\n", {}, "'python' of kernel 'k' must be a Python version such as \"3.12\", not '2.7'"),
    ("    python: \"3.12\"\n    base: debian:12\n", {}, "has both 'python' and 'base'"),
    ("    def: k.def\n    python: \"3.12\"\n", {"k.def": "Bootstrap: scratch\n"},
     "has both 'def' and 'python': a recipe names its own base"),
    ("    image: k.sif\n    requirements: r.txt\n", {"r.txt": "six\n"},
     "has 'requirements' but nothing to install them into"),
    ("    python: \"3.12\"\n    requirements: nope.txt\n", {}, "requirement file 'nope.txt' of kernel 'k' not found"),
    ("    base: Debian:12\n", {}, "'base' of kernel 'k': 'Debian:12': 'library/Debian' is not a valid repository"),
    ("    base: ./missing.sif\n", {}, "base image './missing.sif' of kernel 'k' not found"),
    ("    base: http://example.org/x\n", {}, "is not an image hpc-kernels can fetch"),
    ("    python: \"3.12\"\n    runtime: podman\n", {}, "'python' of kernel 'k' builds Apptainer images only"),
    ("    python: \"3.12\"\n    staging: sometimes\n", {}, "'staging' in kernel 'k' must be one of auto, always, never"),
])
def test_bad_generated_kernels_are_one_sentence_with_their_line(make_registry: Any, body: str,
                                                                files: dict[str, str], needle: str) -> None:
    path = make_registry("kernels:\n  k:\n" + body, files)
    found = problems(path)
    assert any(needle in p for p in found), found
    assert all(p.startswith(f"{path}:") for p in found)


def test_staging_default_and_kernel_override(make_registry: Any) -> None:
    path = make_registry("defaults:\n  staging: never\nkernels:\n  a:\n    python: \"3.11\"\n"
                         "  b:\n    python: \"3.11\"\n    staging: always\n")
    a, b = registry.load_file(path).kernels
    assert (a.staging, b.staging) == (Staging.NEVER, Staging.ALWAYS)
    assert cache.default_fetch(a) is Fetch.NETWORK and cache.default_fetch(b) is Fetch.STAGE


def test_base_can_be_a_reference_or_a_local_image(make_registry: Any) -> None:
    path = make_registry("kernels:\n  r:\n    base: ghcr.io/org/img:1\n  l:\n    base: base.sif\n",
                         {"base.sif": "x"})
    r, local = registry.load_file(path).kernels
    assert str(r.base) == "docker://ghcr.io/org/img:1"
    assert local.base is not None and local.base.transport is oci.Transport.LOCAL
    assert "Bootstrap: localimage\nFrom: " + str(path.parent / "base.sif") in recipegen.generate(local)
    assert "Bootstrap: docker\nFrom: ghcr.io/org/img:1\n" in recipegen.generate(r)


# ----------------------------------------------------------------------------- image references


@pytest.mark.parametrize(("text", "shown"), [
    ("python:3.12-slim", "docker://docker.io/library/python:3.12-slim"),
    ("docker://ubuntu", "docker://docker.io/library/ubuntu:latest"),
    ("127.0.0.1:5000/hpck/debian:bookworm", "docker://127.0.0.1:5000/hpck/debian:bookworm"),
    ("quay.io/a/b@sha256:" + "a" * 64, "docker://quay.io/a/b@sha256:" + "a" * 64),
    ("oras://ghcr.io/o/sif:1", "oras://ghcr.io/o/sif:1"),
    ("library://user/col/name:2", "library://user/col/name:2"),
])
def test_references_are_read_as_apptainer_and_docker_do(text: str, shown: str) -> None:
    assert str(oci.parse(text)) == shown


def test_recipe_headers_with_registry_and_namespace() -> None:
    assert str(oci.from_header("docker", "foo/bar:1", registry="quay.io")) == "docker://quay.io/foo/bar:1"
    assert str(oci.from_header("docker", "bar:1", namespace="team")) == "docker://docker.io/team/bar:1"


class FakeRegistry(http.server.BaseHTTPRequestHandler):
    """Docker Hub's protocol in miniature: a bearer token first, then manifests; 404 for unknown tags."""

    manifest = b'{"schemaVersion": 2}'

    def log_message(self, *_args: Any) -> None:
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_GET(self) -> None:
        host = self.headers["Host"]
        if self.path.startswith("/token?"):
            assert "scope=repository%3Alib%2Fimg%3Apull" in self.path
            self._send(200, b'{"token": "t0k"}')
            return
        if self.headers.get("Authorization") != "Bearer t0k":
            self._send(401, b"{}", {"WWW-Authenticate": f'Bearer realm="http://{host}/token",service="fake",'
                                                         'scope="repository:lib/img:pull"'})
            return
        if self.path == "/v2/lib/img/manifests/1":
            self._send(200, self.manifest, {"Docker-Content-Digest": "sha256:" + "b" * 64})
        elif self.path == "/v2/lib/img/manifests/nodigest":
            self._send(200, self.manifest)
        else:
            self._send(404, b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}')

    do_HEAD = do_GET


@pytest.fixture
def fake_registry() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_tag_resolves_to_its_digest_through_the_token_dance(fake_registry: str) -> None:
    assert oci.resolve(oci.parse(f"{fake_registry}/lib/img:1")) == "sha256:" + "b" * 64
    # No digest header: the manifest's own sha256 is its digest.
    expected = "sha256:" + hashlib.sha256(FakeRegistry.manifest).hexdigest()
    assert oci.resolve(oci.parse(f"{fake_registry}/lib/img:nodigest")) == expected


def test_a_missing_image_and_an_unreachable_registry_are_sentences(fake_registry: str) -> None:
    with pytest.raises(oci.RegistryError) as info:
        oci.resolve(oci.parse(f"{fake_registry}/lib/img:2"))
    assert info.value.kind == "not-found"
    assert str(info.value) == (f"the image lib/img:2 does not exist in the registry {fake_registry} "
                               "(it answered: manifest unknown): check the name and tag.")
    from tests.helpers.oci_registry import free_port

    with pytest.raises(oci.RegistryError) as info:
        oci.resolve(oci.parse(f"127.0.0.1:{free_port()}/lib/img:1"), timeout=5)
    assert info.value.kind == "unreachable" and "cannot reach the registry 127.0.0.1:" in str(info.value)


# ----------------------------------------------------------------------------- requirement files


def test_requirements_are_normalised_with_their_origins(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("# shared\nsix>=1.16  # comment\n")
    (tmp_path / "c.txt").write_text("attrs<30\n")
    (tmp_path / "req.txt").write_text("-r base.txt\n-c c.txt\nattrs \\\n  [tests]\n--index-url https://x/simple\n")
    reqs = requirements.load(tmp_path / "req.txt")
    assert reqs.text == "six>=1.16\nattrs [tests]\n--index-url https://x/simple\n"
    assert reqs.constraints == "attrs<30\n"
    assert reqs.where("SIX") == (tmp_path / "base.txt", 2) and reqs.where("attrs") == (tmp_path / "req.txt", 3)
    assert reqs.names == {"six", "attrs"}


@pytest.mark.parametrize(("text", "needle"), [
    ("six\n-e .\n", "req.txt:2: an editable requirement ('-e .') cannot be installed into an image"),
    ("./mypkg\n", "req.txt:1: './mypkg' is a local path"),
    ("-r other.txt\n", "req.txt:1: '-r other.txt' names"),
])
def test_requirements_hpc_kernels_cannot_install_are_refused_at_their_line(tmp_path: Path, text: str,
                                                                           needle: str) -> None:
    (tmp_path / "req.txt").write_text(text)
    with pytest.raises(requirements.RequirementsError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        requirements.load(tmp_path / "req.txt")


def test_pyproject_dependencies(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\nrequires-python = ">=3.12"\ndependencies = [\n  "numpy>=2",\n  "six",\n]\n')
    reqs = requirements.load(tmp_path / "pyproject.toml")
    assert reqs.kind is requirements.Kind.PYPROJECT and reqs.text == "numpy>=2\nsix\n"
    assert reqs.where("six") == (tmp_path / "pyproject.toml", 6)
    conflict = requirements.python_conflict(reqs, "3.11")
    assert conflict is not None and "requires Python >=3.12, but the base image has Python 3.11" in conflict
    assert requirements.python_conflict(reqs, "3.12") is None
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndynamic = ["dependencies"]\n')
    with pytest.raises(requirements.RequirementsError, match="its dependencies are dynamic"):
        requirements.load(tmp_path / "pyproject.toml")


@pytest.mark.parametrize(("header", "python"), [
    ("# hpc-kernels-lock: 1\n# python: 3.12\n", "3.12"),
    ("#\n# This file is autogenerated by pip-compile with Python 3.10\n# by the following command:\n", "3.10"),
    ("# This file was autogenerated by uv via the following command:\n#    uv pip compile req.in "
     "--python-version 3.13 -o req.txt\n", "3.13"),
    ("six==1.17.0\n", None),
])
def test_the_python_a_lock_was_made_for(tmp_path: Path, header: str, python: str | None) -> None:
    (tmp_path / "lock.txt").write_text(header + "six==1.17.0\n")
    reqs = requirements.load(tmp_path / "lock.txt")
    assert reqs.python == python
    if python:
        conflict = requirements.python_conflict(reqs, "3.11")
        assert conflict == (f"{tmp_path / 'lock.txt'} was resolved for Python {python} (its header says so), but "
                            f"the base image has Python 3.11: resolve it again for 3.11, or use a base with Python "
                            f"{python}.")


def test_a_hand_edited_lock_header_cannot_reach_paths_or_recipes(tmp_path: Path) -> None:
    lock = tmp_path / "k.txt"
    lock.write_text(f"{requirements.LOCK_MARK}\n# python: 3.x; rm -rf /\n# base-digest: ../../../etc/passwd\n"
                    "# requirements-digest: sha256:" + "a" * 64 + "\nsix==1.17.0\n")
    info = requirements.read_lock(lock)
    assert info is not None and info.python is None and info.base_digest is None
    assert info.requirements_digest == "sha256:" + "a" * 64


# ----------------------------------------------------------------------------- what a recipe needs


def test_the_shipped_recipe_needs_its_base_and_its_requirements(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = ROOT / "kernels.yaml"
    (entry,) = [e for e in registry.load_file(path).kernels if e.name == "science"]
    need = needs.needs(entry)
    assert [str(r.ref) for r in need.remote] == ["docker://docker.io/library/python:3.12-slim"]
    # %post's `pip install -r /build/requirements.txt` is mapped back through %files to the file on this node.
    assert [r.path for r in need.post] == [ROOT / "defs" / "science-requirements.txt"]
    assert need.own is None and need.post_specs == () and need.notes == ()


def test_post_pip_lines_and_network_commands_are_found(make_registry: Any) -> None:
    path = make_registry("kernels:\n  k:\n    def: k.def\n", {
        "k.def": "Bootstrap: docker\nFrom: debian:12\n%files\n    reqs /opt/reqs\n%post\n"
                 "    apt-get update && apt-get install -y python3-pip\n"
                 "    python3 -m pip install --no-cache-dir -r /opt/reqs/a.txt numpy==2.0 \\\n        'scipy>=1'\n"
                 "    pip3 install -r /elsewhere.txt\n",
        "reqs/a.txt": "six\n",
    })
    need = needs.needs(registry.load_file(path).kernels[0])
    assert [r.path for r in need.post] == [path.parent / "reqs" / "a.txt"]
    assert need.post_specs == ("numpy==2.0", "scipy>=1")
    assert need.notes == (f"{path.parent / 'k.def'}:6: %post runs 'apt-get', which needs the network",
                          f"{path.parent / 'k.def'}:9: pip installs from /elsewhere.txt, which no %files line "
                          "copies in from this node (hpc-kernels cannot stage what it holds)")


def test_build_steps_that_download_cannot_be_staged(make_registry: Any) -> None:
    path = make_registry("kernels:\n  k:\n    def: k.def\n",
                         {"k.def": "Bootstrap: debootstrap\nMirrorURL: http://deb.debian.org/debian\n"
                                   "OSVersion: bookworm\n"})
    entry = registry.load_file(path).kernels[0]
    with pytest.raises(cache.StagingError) as info:
        inputs.stage(entry)
    assert str(info.value) == (
        f"{path.parent / 'k.def'}:1: 'Bootstrap: debootstrap' downloads Debian packages during the build, which "
        "hpc-kernels cannot stage for a build without network: start from an image (Bootstrap: docker or "
        "localimage), or set 'staging: never' for kernel 'k' and build where there is network.")


# ----------------------------------------------------------------------------- the derived recipe


DEF = """\
# my recipe
Bootstrap: docker
Registry: quay.io
From: org/base:1   # the base
IncludeCmd: yes
Stage: final

%files
    data/in.txt /opt/in.txt
    "my dir/x.txt"
%files from builder
    /a /b

%post
    echo hi

%labels
    mine yes
"""


def test_a_staged_base_becomes_a_local_image_and_relative_paths_absolute(tmp_path: Path) -> None:
    src = recipegen.Source(DEF, tmp_path / "k.def", tmp_path, str(tmp_path / "k.def"))
    (stage,) = recipegen.split(DEF)
    assert stage.get("from") == "org/base:1" and stage.get("registry") == "quay.io"
    sif = tmp_path / "cache" / "bases" / "sha256-x.sif"
    wheels = tmp_path / "cache dir" / "wheels" / "k1"
    how = recipegen.Derivation((("org.hpc-kernels.version", "9"),), bases={0: sif}, offline=True, wheels=wheels,
                               install=recipegen.Install(True, wheels, recipegen.INSTALL_FILE, tmp_path / "pip.whl"))
    text = derive(src, how)
    lines = text.splitlines()
    assert lines[:4] == [f"# Derived by hpc-kernels from {tmp_path / 'k.def'}; that recipe is never written over.",
                         "# my recipe", "Bootstrap: localimage", f"From: {sif}"]
    assert "Registry:" not in text and "IncludeCmd" not in text and "Stage: final" in text
    assert "    export PIP_NO_INDEX=1" in lines and f"    export PIP_FIND_LINKS={recipegen.WHEELS_DIR}" in lines
    assert lines.index("    export PIP_NO_INDEX=1") < lines.index("    echo hi")  # before the recipe's own %post
    assert f"    {tmp_path / 'data/in.txt'} /opt/in.txt" in lines
    assert f'    "{tmp_path / "my dir/x.txt"}"' in lines and "    /a /b" in lines  # %files from: untouched
    assert f'    "{wheels}" /.hpck/wheels' in lines
    assert f"    {tmp_path / 'pip.whl'} /.hpck/pip/pip.whl" in lines
    assert any("/.hpck/pip/pip.whl/pip install --no-index --find-links /.hpck/wheels" in ln for ln in lines)
    assert lines[-2:] == ["%labels", "    org.hpc-kernels.version 9"] and "    mine yes" in lines
    assert "    rm -rf /.hpck" in lines


def test_without_staging_a_registry_base_is_pinned_to_its_digest(tmp_path: Path) -> None:
    src = recipegen.Source(DEF, tmp_path / "k.def", tmp_path, "k.def")
    how = recipegen.Derivation((), pins={0: "quay.io/org/base@sha256:" + "c" * 64})
    text = derive(src, how)
    assert "Bootstrap: docker\nFrom: quay.io/org/base@sha256:" + "c" * 64 + "\nIncludeCmd: yes" in text
    assert "PIP_NO_INDEX" not in text and "Registry:" not in text


def test_an_image_without_a_shell_gets_no_post_section_of_ours(tmp_path: Path) -> None:
    """Bootstrap: scratch (or a distroless base) has no /bin/sh: a %post of ours would fail a build that works."""
    text = "Bootstrap: scratch\n%files\n    payload.txt /payload.txt\n"
    src = recipegen.Source(text, tmp_path / "k.def", tmp_path, "k.def")
    for offline in (False, True):
        derived = derive(src, recipegen.Derivation((("org.hpc-kernels.version", "9"),), offline=offline,
                                                             wheels=tmp_path / "wheels"))
        assert "%post" not in derived and "/.hpck" not in derived
        assert derived.endswith("%labels\n    org.hpc-kernels.version 9\n")


def test_values_that_would_break_a_recipe_are_refused(tmp_path: Path) -> None:
    src = recipegen.Source("Bootstrap: docker\nFrom: x:1\n", None, tmp_path, "gen")
    with pytest.raises(recipegen.RecipeGenError, match="cannot be written into a recipe header"):
        derive(src, recipegen.Derivation((), bases={0: Path("/a#b.sif")}))
    with pytest.raises(recipegen.RecipeGenError, match="holds a quote"):
        recipegen.quote_path('/x"y', "wheelhouse")


# ----------------------------------------------------------------------------- builds (fake builder)


def test_every_build_labels_its_image_and_the_record_keeps_them(make_registry: Any) -> None:
    path = make_registry("defaults:\n  images_dir: images\nkernels:\n  k:\n    def: k.def\n",
                         {"k.def": "Bootstrap: scratch\n%post\n    true\n"})
    entry = registry.load_file(path).kernels[0]
    fake = FakeBuilder()
    orchestrator.build(entry, builder=fake)
    (built,) = fake.recipes
    assert (path.parent / "k.def").read_text() == "Bootstrap: scratch\n%post\n    true\n"  # never written over
    stamp = stamps.read_stamp(entry.image)
    assert stamp is not None
    labels = stamp["labels"]
    assert isinstance(labels, dict)
    assert labels["org.hpc-kernels.recipe-digest"] == "sha256:" + hashlib.sha256(
        b"Bootstrap: scratch\n%post\n    true\n").hexdigest()
    assert labels["org.hpc-kernels.staged"] == "no" and labels["org.hpc-kernels.base"] == "scratch"
    assert f"    org.hpc-kernels.build-id {stamp['build_id']}" in built
    assert f"    org.hpc-kernels.inputs-digest sha256:{stamp['digest']}" in built
    assert "org.hpc-kernels.packages" in built  # written by %post: the image's own package list


def test_the_requirement_file_is_an_input_of_the_build(make_registry: Any) -> None:
    path = make_registry("defaults:\n  images_dir: images\n  staging: never\nkernels:\n  k:\n    base: b.sif\n"
                         "    requirements: req.txt\n", {"b.sif": "sif", "req.txt": "six\n"})
    entry = registry.load_file(path).kernels[0]
    fake = FakeBuilder()
    orchestrator.build(entry, builder=fake)
    assert "-r /.hpck/req/requirements.txt" in fake.recipes[0]
    assert stamps.image_state(entry).status == "built"
    (path.parent / "req.txt").write_text("six==1.16.0\n")
    assert stamps.image_state(entry).status == "stale"
    orchestrator.build(entry, builder=fake)
    assert stamps.image_state(entry).status == "built"
    (path.parent / "kernels.locks").mkdir()
    (path.parent / "kernels.locks" / "k.txt").write_text(requirements.LOCK_MARK + "\nsix==1.16.0\n")
    assert stamps.image_state(entry).status == "stale"  # a lock, once written, is an input too


def test_a_staged_build_without_staged_inputs_names_what_is_missing(make_registry: Any) -> None:
    path = make_registry("defaults:\n  images_dir: images\nkernels:\n  k:\n    def: k.def\n",
                         {"k.def": "Bootstrap: docker\nFrom: 127.0.0.1:9/hpck/debian:1\n"})
    entry = registry.load_file(path).kernels[0]
    fake = FakeBuilder()
    with pytest.raises(BuildError) as info:
        orchestrator.build(entry, builder=fake, fetch=Fetch.STAGED)
    assert str(info.value) == (
        "building kernel 'k' failed: kernel 'k' builds from staged inputs only (no network here), and the base image "
        f"docker://127.0.0.1:9/hpck/debian:1 ({path.parent / 'k.def'}:2) is not in the staging cache: stage it on a "
        "node with internet (a login node) with 'hpc-kernels build k --slurm', which stages before it submits the job.")
    assert fake.recipes == [] and not entry.image.exists()


def test_the_job_builds_offline_from_what_was_staged(make_registry: Any, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_registry("kernels:\n  staged:\n    def: k.def\n  plain:\n    def: k.def\n    staging: never\n",
                         {"k.def": "Bootstrap: localimage\nFrom: b.sif\n", "b.sif": "sif"})
    staged: list[str] = []
    monkeypatch.setattr("hpc_kernels.commands.build.stage_and_report",
                        lambda entry, **_kw: staged.append(entry.name))
    assert cli.main(["build", "staged", "plain", "--slurm", "--dry-run", "--registry", str(path)]) == 0
    out = capsys.readouterr().out
    assert staged == ["staged"]  # staging: never is not staged
    assert '"$kernel" --registry ' in out and " --offline\n" in out
    assert "# the recipe the job builds for kernel 'staged', from the inputs staged on this node" in out
    assert "# the recipe the job builds for kernel 'plain', as its recipe says (staging: never)" in out


def test_offline_and_staging_flags_do_not_mix(make_registry: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_registry("kernels:\n  k:\n    def: k.def\n", {"k.def": "Bootstrap: scratch\n"})
    assert cli.main(["build", "k", "--offline", "--lock", "--registry", str(path)]) == 2
    assert "--offline builds from what was staged; --lock and --pull stage anew" in capsys.readouterr().err
    assert cli.main(["build", "k", "--offline", "--slurm", "--registry", str(path)]) == 2
    assert "--offline is for a build here" in capsys.readouterr().err


def test_show_prints_what_the_image_says_and_list_its_build_id(make_registry: Any,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_registry("defaults:\n  images_dir: images\nkernels:\n  k:\n    def: k.def\n",
                         {"k.def": "Bootstrap: scratch\n"})
    entry = registry.load_file(path).kernels[0]
    orchestrator.build(entry, builder=FakeBuilder())
    stamp = stamps.read_stamp(entry.image) or {}
    monkeypatch.setenv("PATH", "/nonexistent")  # no apptainer: the build record's copy of the labels
    assert cli.main(["show", "k", "--registry", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"image ({entry.image}, built " in out and "; from its build record):" in out
    assert f"  build id:            {stamp['build_id']}\n" in out
    assert "  base:                scratch\n" in out and "  hpc-kernels:         0.1.0\n" in out
    assert cli.main(["show", "k", "--json", "--registry", str(path)]) == 0
    image = json.loads(capsys.readouterr().out)["image"]
    assert image["build_id"] == stamp["build_id"] and image["source"] == "build record"
    assert cli.main(["list", "--builds", "--registry", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["kernel", "runtime/mode", "image", "state", "build", "installed"]
    assert f" built  {stamp['build_id']}  " in out


def test_show_recipe_prints_the_generated_recipe(make_registry: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_registry('kernels:\n  ana:\n    python: "3.12"\n    requirements: req.txt\n', {"req.txt": "six\n"})
    assert cli.main(["show", "ana", "--recipe", "--registry", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\nBootstrap: docker\nFrom: python:3.12-slim\n" in out
    assert "-m pip install --no-cache-dir -r /.hpck/req/requirements.txt" in out
    assert "import ipykernel" in out  # added when the base lacks it
    assert f"    org.hpc-kernels.requirements {path.parent / 'req.txt'}\n" in out


# ----------------------------------------------------------------------------- pip's failures


PROBE = cache.Probe("3.11.2", "cpython", "x86_64", "glibc", "2.36", True, False, "/usr/bin/python3")


def test_platform_tags_follow_the_image_libc() -> None:
    tags = PROBE.platforms()
    assert tags[0] == "manylinux_2_36_x86_64" and tags[-2:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    musl = cache.Probe("3.12.1", "cpython", "aarch64", "musl", "", False, True, "/usr/bin/python3")
    assert musl.platforms() == ["musllinux_1_2_aarch64", "musllinux_1_1_aarch64"]


def test_a_package_pip_cannot_find_is_named_at_its_line(make_registry: Any) -> None:
    path = make_registry("kernels:\n  k:\n    python: \"3.11\"\n    requirements: req.txt\n",
                         {"req.txt": "six\n\nnumpy==9.9  # too new\n"})
    need = needs.needs(registry.load_file(path).kernels[0])
    output = ("ERROR: Could not find a version that satisfies the requirement numpy==9.9 (from versions: 1.26.4, "
              "2.0.0)\nERROR: No matching distribution found for numpy==9.9\n")
    assert wheelhouse.pip_failure(output, need, PROBE, "k") == (
        f"kernel 'k': {path.parent / 'req.txt'}:3: pip found no wheel of 'numpy==9.9' for Python 3.11 on "
        "manylinux_2_36_x86_64 (versions with wheels: 1.26.4, 2.0.0): check the name and version; packages "
        "published only as source cannot be staged.")
    conflict = ("    The user requested six==1.16.0\n    The user requested six==1.17.0\n"
                "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io\n")
    assert wheelhouse.pip_failure(conflict, need, PROBE, "k").startswith(
        "kernel 'k': the requirements contradict each other for Python 3.11 on manylinux_2_36_x86_64 (The user "
        "requested six==1.16.0 The user requested six==1.17.0): loosen or fix the pins.")
