"""Files on a local disk or in a bucket (gs://), through one Path type.

A pod's work dir and data live in a bucket. Every path a command reads or writes goes
through `path()`, which gives an `etils.epath.Path` (pathlib's API; gcsfs behind gs://, as
orbax, tfds and big_vision do it). Orbax and tensorstore write checkpoints to gs://
themselves, and ArrayRecord's reader opens gs:// shards itself. A URL this project cannot
honour fails here, naming it: it never becomes a relative local folder called `gs:`
(what `pathlib.Path("gs://b/run")` is).

A leaf: imports neither JAX nor TensorFlow.
"""

import contextlib
import os
import re
import shutil
import tempfile

from etils import epath

SCHEMES = ("gs",)  # the URL schemes honoured; anything else is refused (StorageError)
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):(?P<slashes>/*)(?P<rest>.*)$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_COPY_CHUNK = 16 << 20  # bytes: one upload or download request's worth


class StorageError(ValueError):
    """A path that names storage this project cannot read or write."""


def path(location: "str | os.PathLike[str]") -> epath.Path:
    """`location` as a Path: a local path as given, or a gs://BUCKET/... URL. Raises
    StorageError for another scheme (s3://, http://) or a malformed URL (gs:/b, gs://)."""
    text = os.fspath(location)
    url = _URL.match(text)
    if url is None or not url["slashes"]:  # a local path (possibly with a colon in a name)
        return epath.Path(text)
    scheme = url["scheme"].lower()
    if scheme not in SCHEMES:
        raise StorageError(
            f"{text}: {scheme}:// is not supported; use a local path or gs://BUCKET/..."
        )
    bucket = url["rest"].split("/", 1)[0]
    if url["slashes"] != "//" or not _BUCKET.match(bucket):
        raise StorageError(f"{text} is not a URL of the form {scheme}://BUCKET/PATH")
    return epath.Path(f"{scheme}://{url['rest'].rstrip('/')}")


def is_remote(location: "str | os.PathLike[str]") -> bool:
    """True for a bucket URL (after `path()` has accepted it)."""
    return "://" in os.fspath(location)


def absolute(location: "str | os.PathLike[str]") -> epath.Path:
    """A local path made absolute, or the bucket URL as it is."""
    p = path(location)
    return p if is_remote(p) else epath.Path(os.path.abspath(os.fspath(p)))


def _fs(p: epath.Path):
    import fsspec  # gcsfs registers itself for gs://

    return fsspec.core.url_to_fs(os.fspath(p))[0]


def write_atomic(p: epath.Path, data: bytes | str) -> None:
    """Write a whole file or none of it: a local file is written beside and renamed over
    `p`; a bucket object is replaced in one upload, which the store makes atomic."""
    data = data.encode() if isinstance(data, str) else data
    if is_remote(p):
        p.write_bytes(data)
        return
    fd, staging = tempfile.mkstemp(prefix=f".{p.name}.", dir=os.fspath(p.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, os.fspath(p))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


def free_bytes(p: epath.Path) -> int | None:
    """Bytes free for this user on the disk that holds `p` (or its nearest existing
    parent); None for a bucket, which has no such limit to check."""
    if is_remote(p):
        return None
    existing = os.path.abspath(os.fspath(p))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    stats = os.statvfs(existing)
    return stats.f_bavail * stats.f_frsize


def files_under(folder: epath.Path) -> list[str]:
    """Every file below `folder`, as sorted '/'-separated paths relative to it. (epath's
    rglob refuses gs://, to spare a bucket one listing per folder: a bucket lists every
    object under a prefix in one call.)"""
    if is_remote(folder):
        fs = _fs(folder)
        root = fs._strip_protocol(os.fspath(folder)).rstrip("/")
        found = fs.find(root) if fs.exists(root) else []
        return sorted(name[len(root) + 1 :] for name in found if name != root)
    root = os.fspath(folder)
    return sorted(
        os.path.relpath(os.path.join(top, name), root).replace(os.sep, "/")
        for top, _, names in os.walk(root)
        for name in names
    )


def copy_file(src: epath.Path, dst: epath.Path) -> None:
    """One file, local or in a bucket on either side, streamed in chunks."""
    if not is_remote(dst):
        os.makedirs(os.fspath(dst.parent), exist_ok=True)
    with src.open("rb") as reader, dst.open("wb") as writer:
        shutil.copyfileobj(reader, writer, _COPY_CHUNK)


def copy_tree(src: epath.Path, dst: epath.Path, last: tuple[str, ...] = ()) -> None:
    """Every file below `src` to the same place below `dst`; the files named in `last`
    (relative paths) after all others, so a reader that looks for them first never finds
    a half-copied tree."""
    rank = {name: i + 1 for i, name in enumerate(last)}
    for name in sorted(files_under(src), key=lambda n: rank.get(n, 0)):
        copy_file(src / name, dst / name)


def remove_tree(p: epath.Path) -> None:
    """`p` and everything below it; nothing if it is not there."""
    if is_remote(p):
        fs = _fs(p)
        root = fs._strip_protocol(os.fspath(p))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        fs.invalidate_cache()
        return
    shutil.rmtree(os.fspath(p), ignore_errors=True)


def move_tree(src: epath.Path, dst: epath.Path) -> None:
    """Rename a folder. On a bucket, which has no folders to rename, every object is copied
    and then the originals deleted: not atomic, but nothing is lost at any moment."""
    if not is_remote(src) and not is_remote(dst):
        os.rename(os.fspath(src), os.fspath(dst))
        return
    copy_tree(src, dst)
    remove_tree(src)


def download(p: epath.Path, cache_root: "str | os.PathLike[str] | None" = None) -> epath.Path:
    """A local copy of folder `p` (or `p` itself when it is local), for tools that open
    files by name. Kept in `cache_root` (default ~/.cache/sora_jax/downloads): a file
    already there with the object's size is not fetched again."""
    if not is_remote(p):
        return p
    import hashlib

    root = cache_root or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sora_jax", "downloads"
    )
    target = epath.Path(root) / hashlib.sha256(os.fspath(p).encode()).hexdigest()[:16] / p.name
    fs = _fs(p)
    for name in files_under(p):
        dst = target / name
        size = fs.size(fs._strip_protocol(os.fspath(p / name)))
        if not dst.exists() or dst.stat().length != size:
            copy_file(p / name, dst)
    return target


def client_environment() -> None:
    """Before any bucket is opened, in an entry point: epath reaches gs:// through gcsfs,
    not TensorFlow (which would be imported into every training process, 2.3 s and 480 MB,
    only to list a folder); and gcsfs's listings are not cached, so that a process sees what
    another has written since (a checkpoint, a lock). Values the user set are kept."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    os.environ.setdefault("FSSPEC_GCS_USE_LISTINGS_CACHE", "false")  # for child processes
    import fsspec.config  # read its environment at import: this process may have done so

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
