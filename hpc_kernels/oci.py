"""Base images by reference: parsing them as Apptainer and Docker do, and asking a registry for the digest
a tag points to (so a base is pulled once and reused by digest, and an image can say what it came from).

Only the one question staging needs is asked: ``HEAD /v2/<repository>/manifests/<tag>``, with Docker Hub's
anonymous token dance when the registry wants one. Pulling is Apptainer's job (:mod:`hpc_kernels.staging`).
Standard library only; no credentials are stored: ``APPTAINER_DOCKER_USERNAME``/``_PASSWORD`` (Apptainer's own
variables) are used when set.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from hpc_kernels.errors import HpcKernelsError


class Transport(str, enum.Enum):
    """Where a base image comes from."""

    DOCKER = "docker"  # an OCI/Docker registry (Docker Hub, ghcr.io, quay.io, a site registry)
    ORAS = "oras"  # a SIF stored as an OCI artifact in a registry
    LIBRARY = "library"  # a Sylabs-style library (no digest lookup: pulled, then addressed by the SIF's sha256)
    LOCAL = "local"  # a .sif (or sandbox) on this filesystem


#: Bootstrap agents whose base hpc-kernels can stage (fetch on the login node), and their transports.
STAGEABLE = {"docker": Transport.DOCKER, "oras": Transport.ORAS, "library": Transport.LIBRARY}

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# The Docker reference grammar (distribution/reference), simplified: lowercase path components.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*" \
          r"|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
#: Media types we accept for a manifest (multi-arch indexes first: their digest is what people pin).
ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
TIMEOUT = 30.0


class ImageRefError(HpcKernelsError):
    """A reference that is not one (a bad character, an empty name...)."""


class RegistryError(HpcKernelsError):
    """A registry could not tell us a digest; ``kind`` says why (not-found, unreachable, denied, bad-answer)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass(frozen=True)
class ImageRef:
    """A base image: ``transport`` and, for registries, the normalised parts of the reference."""

    transport: Transport
    domain: str = ""  # docker.io, ghcr.io, 127.0.0.1:5000 (registries); "" for library and local
    repository: str = ""  # library/python, user/collection/name; the path for LOCAL
    tag: str = ""  # "" when only a digest was given
    digest: str = ""  # sha256:... when the reference pins one

    @property
    def name(self) -> str:
        """``domain/repository`` (registries), the path (local)."""
        return f"{self.domain}/{self.repository}" if self.domain else self.repository

    def __str__(self) -> str:
        """The reference as Apptainer takes it: ``docker://docker.io/library/python:3.12-slim``."""
        if self.transport is Transport.LOCAL:
            return self.repository
        text = f"{self.transport.value}://{self.name}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def pinned(self, digest: str) -> ImageRef:
        """The same image by ``digest`` (no tag: Apptainer's libraries refuse a tag and a digest together)."""
        return ImageRef(self.transport, self.domain, self.repository, "", digest)

    @property
    def insecure(self) -> bool:
        """Plain HTTP: a loopback registry (as Docker does), or ``APPTAINER_NOHTTPS`` set."""
        if os.environ.get("APPTAINER_NOHTTPS") or os.environ.get("SINGULARITY_NOHTTPS"):
            return True
        host = self.domain.rsplit(":", 1)[0] if not self.domain.startswith("[") else self.domain.split("]")[0][1:]
        return host == "localhost" or host.startswith("127.") or host == "::1"


def parse(text: str, transport: Transport = Transport.DOCKER) -> ImageRef:
    """``text`` (``python:3.12-slim``, ``docker://ghcr.io/o/n@sha256:…``, ``oras://host/n:t``, ``library://u/c/n``)
    as an :class:`ImageRef`; a ``scheme://`` prefix overrides ``transport``. :class:`ImageRefError` says what is
    wrong."""
    value = text.strip()
    if "://" in value:
        scheme, _, value = value.partition("://")
        try:
            transport = Transport(scheme.lower())
        except ValueError:
            raise ImageRefError(f"'{text}' is not an image hpc-kernels can fetch (use docker://, oras://, "
                                "library:// or the path of a .sif).") from None
        if transport is Transport.LOCAL:
            raise ImageRefError(f"'{text}': write the path of a local image without a scheme.")
    if not value:
        raise ImageRefError("the image reference is empty.")
    if transport is Transport.LOCAL:
        return ImageRef(Transport.LOCAL, repository=value)
    digest = ""
    if "@" in value:
        value, _, digest = value.partition("@")
        if not DIGEST_RE.match(digest):
            raise ImageRefError(f"'{text}': the digest must be sha256: and 64 lowercase hex digits.")
    tag = ""
    last = value.rsplit("/", 1)[-1]
    if ":" in last:
        value, _, tag = value.rpartition(":")
        if not _TAG_RE.match(tag):
            raise ImageRefError(f"'{text}': '{tag}' is not a valid tag.")
    if transport is Transport.LIBRARY:
        parts = value.strip("/").split("/")
        if not all(parts) or not _REPO_RE.match("/".join(parts)):
            raise ImageRefError(f"'{text}' is not a valid library reference (library://user/collection/name:tag).")
        return ImageRef(transport, "", "/".join(parts), tag or ("" if digest else "latest"), digest)
    first, _, rest = value.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        domain, repository = first, rest
    elif transport is Transport.ORAS:
        raise ImageRefError(f"'{text}': an oras:// reference names its registry (oras://host/name:tag).")
    else:
        domain, repository = DOCKER_HUB, value
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not _DOMAIN_RE.match(domain):
        raise ImageRefError(f"'{text}': '{domain}' is not a valid registry host.")
    if not _REPO_RE.match(repository):
        raise ImageRefError(f"'{text}': '{repository}' is not a valid repository name (lowercase letters, digits, "
                            "'.', '_', '-' and '/').")
    return ImageRef(transport, domain, repository, tag or ("" if digest else "latest"), digest)


def from_header(bootstrap: str, source: str, registry: str = "", namespace: str = "") -> ImageRef:
    """The base of a recipe stage: ``Bootstrap:``'s agent, ``From:`` and the optional ``Registry:``/``Namespace:``."""
    transport = STAGEABLE[bootstrap.lower()]
    value = source.strip()
    if "://" in value:
        value = value.split("://", 1)[1]
    if transport is Transport.DOCKER and (registry or namespace):
        path = value if not namespace or "/" in value.split(":", 1)[0] else f"{namespace.strip('/')}/{value}"
        value = f"{registry.strip('/')}/{path}" if registry else path
    return parse(value, transport)


def api_host(ref: ImageRef) -> str:
    """Where the registry API of ``ref`` answers (Docker Hub's is not docker.io)."""
    return DOCKER_HUB_API if ref.domain == DOCKER_HUB else ref.domain


def resolve(ref: ImageRef, timeout: float = TIMEOUT) -> str:
    """The digest (``sha256:…``) the registry serves for ``ref``'s tag (or its digest, checked to exist).

    Raises :class:`RegistryError`: ``not-found`` (no such repository or tag), ``denied`` (private, or a login
    is needed), ``unreachable`` (no route, DNS, refused, time-out), ``bad-answer`` (not a registry).
    """
    if ref.transport not in (Transport.DOCKER, Transport.ORAS):
        raise ValueError(f"no digest lookup for {ref.transport.value} references")
    scheme = "http" if ref.insecure else "https"
    url = f"{scheme}://{api_host(ref)}/v2/{ref.repository}/manifests/{ref.digest or ref.tag}"
    status, headers, body = _request("HEAD", url, {"Accept": ACCEPT}, ref, timeout)
    if status == 401:
        token = _token(headers.get("www-authenticate", ""), ref, timeout)
        if token is None:
            raise RegistryError("denied", f"{ref.domain} wants a login to read {ref.name} "
                                "(set APPTAINER_DOCKER_USERNAME and APPTAINER_DOCKER_PASSWORD, as for Apptainer).")
        status, headers, body = _request("HEAD", url, {"Accept": ACCEPT, "Authorization": token}, ref, timeout)
        auth = token
    else:
        auth = ""
    if status in (401, 403):
        # Docker Hub answers 401 for a repository that does not exist as for one that is private.
        raise RegistryError("denied", f"{_shown(ref)} does not exist in the registry {ref.domain}, or is private "
                            f"(it answered HTTP {status}).")
    if status == 404:
        why = _error_text(*_request("GET", url, {"Accept": ACCEPT, **({"Authorization": auth} if auth else {})},
                                    ref, timeout))
        raise RegistryError("not-found", f"{_shown(ref)} does not exist in the registry {ref.domain} "
                            f"(it answered: {why or 'not found'}): check the name and tag.")
    if status != 200:
        raise RegistryError("bad-answer", f"{ref.domain} answered HTTP {status} for {_shown(ref)}.")
    digest = headers.get("docker-content-digest", "")
    if not DIGEST_RE.match(digest):
        # Some registries send no digest with HEAD: the manifest's own sha256 is its digest.
        status, headers, body = _request("GET", url, {"Accept": ACCEPT, **({"Authorization": auth} if auth else {})},
                                         ref, timeout)
        if status != 200:
            raise RegistryError("bad-answer", f"{ref.domain} answered HTTP {status} for {_shown(ref)}.")

        digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest and digest != ref.digest:
        raise RegistryError("bad-answer", f"{ref.domain} served {digest} for {_shown(ref)}.")
    return digest


def _shown(ref: ImageRef) -> str:
    return f"the image {ref.repository}" + (f":{ref.tag}" if ref.tag else "") + (f"@{ref.digest}" if ref.digest else "")


def _credentials() -> tuple[str, str] | None:
    for prefix in ("APPTAINER_DOCKER_", "SINGULARITY_DOCKER_"):
        user, password = os.environ.get(prefix + "USERNAME"), os.environ.get(prefix + "PASSWORD")
        if user and password:
            return user, password
    return None


def _basic(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def _token(challenge: str, ref: ImageRef, timeout: float) -> str | None:
    """The ``Authorization`` value for a 401 ``challenge``: a bearer token (anonymous, or with the credentials)."""
    scheme, _, params = challenge.partition(" ")
    creds = _credentials()
    if scheme.lower() == "basic":
        return _basic(creds) if creds else None
    if scheme.lower() != "bearer":
        return None
    fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
    realm = fields.get("realm")
    if not realm or not realm.startswith(("https://", "http://")):
        return None

    query = {"scope": fields.get("scope") or f"repository:{ref.repository}:pull"}
    if fields.get("service"):
        query["service"] = fields["service"]
    headers = {"Authorization": _basic(creds)} if creds else {}
    status, _headers, body = _request("GET", f"{realm}?{urlencode(query)}", headers, ref, timeout)
    if status != 200:
        return None

    try:
        answer = json.loads(body)
        token = answer.get("token") or answer.get("access_token")
    except (ValueError, AttributeError):
        return None
    return f"Bearer {token}" if isinstance(token, str) and token else None


def _error_text(status: int, headers: dict[str, str], body: bytes) -> str:
    """The message of a registry's error document (``{"errors": [{"code": "MANIFEST_UNKNOWN", ...}]}``)."""
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))[:200]
    except (ValueError, AttributeError):
        return ""


def _request(method: str, url: str, headers: dict[str, str], ref: ImageRef,
             timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request; HTTP errors are answers (status, lowercase headers, body), network failures raise."""
    import urllib.error  # why: urllib.request costs ~15 ms, and only a registry lookup needs it
    import urllib.request

    request = urllib.request.Request(url, method=method, headers={"User-Agent": "hpc-kernels", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read(1 << 22)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read(1 << 16)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryError("unreachable", f"cannot reach the registry {ref.domain} from this node ({reason}).") \
            from None


def sif_digest(path: Path) -> str:
    """``sha256:…`` of a local image file (what identifies a local or library base)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
