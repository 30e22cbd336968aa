"""What `thaw deploy PATH|IMAGE` uploads: a bundle folder as is, or the bundle folder
inside a container image, pinned to that image.

Why the upload stays a bundle (DESIGN.md §9)
    The gateway and the scheduler have no docker engine (and no registry is reachable
    anywhere), so they cannot read an image; `POST /v1/functions` takes the bundle
    tarball only. The CLI, which runs where the image was built, reads the image on
    the local engine and uploads the bundle it carries, with the image named in its
    thaw.toml: `[runtime] image = "<repo:tag>@<image id>"` (core/spec.py). Naming it in
    thaw.toml rather than in a field beside the upload keeps the upload one format and
    makes the bundle's digest, hence the function version, cover the image id: a
    rebuilt image under the same tag is another id, another thaw.toml, a new version.
    The node runs the function's containers from that image id (the docker runtime,
    platform/docker/__init__.py, "Image functions"); it must have the image (`docker
    save | docker load` to other nodes).

The image's contract
    The bundle folder (thaw.toml, the handler's code) sits at the path the image label
    `org.thaw.bundle` names, `/app` by default; the Python packages the code imports
    are installed in the image. The CLI copies the folder out without running anything
    of the image: a container is created, never started, its folder read with
    `get_archive`, and the container removed.

A folder whose thaw.toml names an image by tag only (`[runtime] image = "app:v1"`)
is pinned the same way before its upload, to the id the local engine has for the
tag."""

from __future__ import annotations

import contextlib
import io
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from thaw.core.errors import ThawError
from thaw.core.spec import (
    IMAGE_ID_PATTERN,
    IMAGE_PATTERN,
    MAX_BUNDLE_BYTES,
    pack_bundle,
    pin_runtime_image,
    read_bundle,
)

# Image label naming the bundle folder inside the image, and its default.
BUNDLE_LABEL = "org.thaw.bundle"
DEFAULT_BUNDLE_PATH = "/app"
# Label of the container created (never started) to copy the folder out.
COPY_LABEL = "org.thaw.deploy-copy"
# The folder's archive is read into memory: past this it cannot be a bundle (which
# the gateway caps at MAX_BUNDLE_BYTES gzip'd; tar of code compresses ~4x).
MAX_ARCHIVE_BYTES = 4 * MAX_BUNDLE_BYTES


@dataclass(frozen=True)
class ImageBundle:
    """A bundle taken out of an image, with `[runtime] image` pinned in its thaw.toml."""

    image: str
    """The pinned reference (`repo:tag@sha256:<id>`) written into thaw.toml."""
    bundle_path: str
    """Where the bundle folder was in the image."""
    data: bytes
    """The gzip'd tarball to upload."""
    archive: Path | None = None
    """The `docker save` archive it came from, which goes up first
    (upload_image_archive); None for an image on the local engine."""


def deploy_target(argument: str) -> Path | str:
    """A folder (deployed as a bundle) or else an image: a file is a `docker save`
    archive, anything else a reference on the local engine (both read by
    bundle_from_image)."""
    path = Path(argument)
    if path.is_dir():
        return path
    if path.exists() and not path.is_file():
        raise ThawError(f"{argument} is neither a folder nor a file: deploy a bundle "
                        "folder (with thaw.toml), an image archive or an image")
    return argument


def _engine(argument: str) -> Any:
    from thaw.platform import images

    try:
        return images.docker_client()
    except ThawError as exc:
        raise ThawError(f"{argument} is not a folder, and it cannot be looked up as an "
                        f"image: {exc.message}") from exc


def _find_image(client: Any, reference: str) -> Any:
    import docker.errors

    try:
        return client.images.get(reference)
    except (docker.errors.ImageNotFound, docker.errors.NullResource) as exc:
        raise ThawError(f"{reference} is neither a folder nor an image the local docker "
                        "engine has (nothing is pulled: build or load the image first)"
                        ) from exc
    except docker.errors.APIError as exc:  # e.g. "invalid reference format"
        raise ThawError(f"{reference} is neither a folder nor an image reference the "
                        f"local docker engine accepts: {exc.explanation or exc}") from exc
    except docker.errors.DockerException as exc:
        raise ThawError(f"docker engine: {exc}") from exc


def pinned_reference(reference: str, image: Any) -> str:
    """`<repository[:tag]>@<image id>` for what the user named: the name as typed
    (a registry digest dropped; an id replaced by the image's first tag, if any)."""
    image_id = str(image.id)
    name = reference.split("@", 1)[0]
    by_id = (IMAGE_ID_PATTERN.match(reference) is not None
             or image_id.removeprefix("sha256:").startswith(reference.removeprefix("sha256:")))
    if by_id:
        tags = list(image.tags or [])
        name = tags[0] if tags else ""
    pinned = f"{name}@{image_id}"
    if not IMAGE_PATTERN.match(pinned):
        # A name docker accepts that the simplified grammar does not: pin by id alone.
        pinned = f"@{image_id}"
    return pinned


def _read_archive(chunks: Iterator[bytes], limit: int = MAX_ARCHIVE_BYTES) -> bytes:
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise ThawError(f"the image's bundle folder is larger than {limit} bytes: a "
                            "bundle carries code; put weights and packages in the image "
                            "outside it")
    return bytes(buf)


def _copy_out(client: Any, image: Any, reference: str, bundle_path: str,
              dest: Path) -> Path:
    """The image's folder `bundle_path`, extracted under `dest`; a created (never
    started) container is the engine's way to read an image's files."""
    import docker.errors

    try:
        container = client.containers.create(
            image.id, command=["sh"], labels={COPY_LABEL: reference},
            network_disabled=True)
    except docker.errors.DockerException as exc:
        raise ThawError(f"cannot read image {reference}: {exc}") from exc
    try:
        try:
            chunks, stat = container.get_archive(bundle_path)
        except docker.errors.NotFound as exc:
            raise ThawError(
                f"image {reference} has no {bundle_path}: put the bundle folder (with "
                f"thaw.toml) there, or name its path with the label {BUNDLE_LABEL}"
            ) from exc
        if not stat.get("mode", 0) & (1 << 31):  # Go's os.ModeDir
            raise ThawError(f"{bundle_path} in image {reference} is not a folder "
                            f"(label {BUNDLE_LABEL} names the bundle folder)")
        archive = _read_archive(chunks)
    except docker.errors.DockerException as exc:
        raise ThawError(f"cannot read {bundle_path} of image {reference}: {exc}") from exc
    finally:
        with contextlib.suppress(docker.errors.DockerException):
            container.remove(force=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ThawError(f"cannot unpack {bundle_path} of image {reference}: {exc}") from exc
    return dest / posixpath.basename(bundle_path.rstrip("/"))


def _bundle_path(labels: Any, reference: str) -> str:
    bundle_path = str((labels or {}).get(BUNDLE_LABEL) or DEFAULT_BUNDLE_PATH)
    if not posixpath.isabs(bundle_path) or posixpath.normpath(bundle_path) == "/":
        raise ThawError(f"label {BUNDLE_LABEL} of image {reference} must be an absolute "
                        f"folder other than /, got {bundle_path!r}")
    return posixpath.normpath(bundle_path)


def _pack_pinned(folder: Path, pinned: str, reference: str, bundle_path: str) -> bytes:
    """The bundle folder taken out of an image, its thaw.toml pinned, packed."""
    toml = folder / "thaw.toml"
    if not toml.is_file():
        raise ThawError(f"image {reference} has no thaw.toml in {bundle_path} (the "
                        f"bundle folder; label {BUNDLE_LABEL} names another)")
    toml.write_text(pin_runtime_image(toml.read_text(), pinned))
    return pack_bundle(str(folder))


def bundle_from_image(reference: str, client: Any = None) -> ImageBundle:
    """The bundle inside image `reference` (an image on the local engine, or a
    `docker save` archive file), its thaw.toml pinned to the image's id, packed and
    checked as the gateway will check it."""
    if Path(reference).is_file():
        return bundle_from_archive(Path(reference))
    client = client or _engine(reference)
    image = _find_image(client, reference)
    bundle_path = _bundle_path(image.labels, reference)
    pinned = pinned_reference(reference, image)
    with tempfile.TemporaryDirectory(prefix="thaw-image-bundle-") as tmp:
        folder = _copy_out(client, image, reference, bundle_path, Path(tmp))
        data = _pack_pinned(folder, pinned, reference, bundle_path)
    read_bundle(data)  # fail here, with the key at fault, before uploading
    return ImageBundle(pinned, bundle_path, data)


def archive_reference(image: Any) -> str:
    """`<first tag>@<image id>` of an archive's image, or `@<image id>` untagged."""
    tags = [t for t in image.repo_tags if IMAGE_PATTERN.match(f"{t}@{image.image_id}")]
    return f"{tags[0]}@{image.image_id}" if tags else f"@{image.image_id}"


def bundle_from_archive(path: Path, limit: int = MAX_ARCHIVE_BYTES) -> ImageBundle:
    """The bundle inside the image a `docker save` archive holds (read as a stream,
    ops/image_archive.py), pinned to the image's id (its config's digest, checked)."""
    from thaw.core.image_archive import read_image
    from thaw.ops.image_archive import bundle_tree, write_tree

    image = read_image(path)
    bundle_path = _bundle_path(image.labels, path.name)
    pinned = archive_reference(image)
    tree = bundle_tree(path, image, bundle_path, limit)
    if not tree:
        raise ThawError(
            f"image archive {path.name} has no {bundle_path}: put the bundle folder "
            f"(with thaw.toml) there, or name its path with the label {BUNDLE_LABEL}")
    with tempfile.TemporaryDirectory(prefix="thaw-archive-bundle-") as tmp:
        folder = Path(tmp) / posixpath.basename(bundle_path)
        write_tree(tree, folder)
        data = _pack_pinned(folder, pinned, f"archive {path.name}", bundle_path)
    read_bundle(data)
    return ImageBundle(pinned, bundle_path, data, archive=path)


def upload_image_archive(bundle: ImageBundle, client: Any = None) -> bool:
    """Send the archive `bundle` came from to the platform (`PUT /v1/images/<id>`,
    streamed from the file, a progress bar), unless the platform has it already.
    True when it was sent; False for an image not from an archive, or one already
    stored."""
    archive = bundle.archive
    if archive is None:
        return False
    from thaw.ops.client import DEPLOY_TIMEOUT, Client
    from thaw.ops.image_archive import archive_pieces
    from thaw.ops.progress import transfer_progress

    client = client or Client()
    image_id = bundle.image.rpartition("@")[2]
    if client.request("GET", f"/v1/images/{image_id}").json().get("stored"):
        return False
    size = archive.stat().st_size
    with transfer_progress(transient=True) as progress:
        task = progress.add_task(f"uploading {archive.name}", total=size)

        def pieces() -> Iterator[bytes]:
            for piece in archive_pieces(archive):
                yield piece
                progress.advance(task, len(piece))

        client.request("PUT", f"/v1/images/{image_id}", content=pieces(),
                       timeout=DEPLOY_TIMEOUT,
                       headers={"Content-Type": "application/x-tar",
                                "Content-Length": str(size)})
    return True


def unpinned_image(folder: Path) -> str:
    """The image a folder's thaw.toml names by tag only ('' if none, or pinned)."""
    try:
        doc = tomllib.loads((folder / "thaw.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""  # read_bundle reports it, naming the key
    runtime = doc.get("runtime")
    image = runtime.get("image") if isinstance(runtime, dict) else None
    return image if isinstance(image, str) and image and "@" not in image else ""


def bundle_from_folder(folder: Path, client: Any = None) -> bytes:
    """A bundle folder, packed; a thaw.toml naming an image by tag gets it pinned to
    the local engine's id for the tag first (on a copy: the folder is not touched)."""
    from thaw.ops.client import read_bundle_dir

    if not (folder / "thaw.toml").exists():
        raise ThawError(f"{folder} has no thaw.toml (a bundle folder needs one)")
    reference = unpinned_image(folder)
    if not reference:
        return read_bundle_dir(folder)
    client = client or _engine(reference)
    pinned = pinned_reference(reference, _find_image(client, reference))
    with tempfile.TemporaryDirectory(prefix="thaw-pinned-bundle-") as tmp:
        copy = Path(tmp) / folder.name
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(
            "__pycache__", ".git", ".venv", ".thaw"))
        text = (copy / "thaw.toml").read_text()
        for quote in ('"', "'"):
            text = text.replace(f"{quote}{reference}{quote}", f'"{pinned}"', 1)
        doc = tomllib.loads(text)
        if doc.get("runtime", {}).get("image") != pinned:
            raise ThawError(f"could not pin runtime.image {reference!r} in "
                            f"{folder / 'thaw.toml'}: write it as {pinned!r}")
        (copy / "thaw.toml").write_text(text)
        return read_bundle_dir(copy)
