"""Where shard bytes come from: a local folder, or object storage through an fsspec URL.

A store lists the shards under its root once (the files whose suffix a format claims, data/formats/; recursively,
ordered by their path relative to the root, so a local copy and a bucket of the same files give the same order),
tells their sizes and reads byte ranges. Parsing shards is their format's (data/formats/); the store only moves bytes.

- A local folder (or a `file://` URL) is read as it always was: `find_shards` lists it and `ShardReader` reads it
  with pread(2) from an open file descriptor.
- `s3://`, `gs://`, `hf://` and any other protocol fsspec knows are read with ranged requests through the
  protocol's library (`s3fs`, `gcsfs`, `huggingface_hub`: optional extras). Credentials come from the library's
  own environment and files (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws for S3;
  GOOGLE_APPLICATION_CREDENTIALS for GCS; HF_TOKEN for the Hub); a URL carrying `user:secret@` or a token in its
  query is refused (urls.py), so a secret never reaches the printed or stored config.

A request that fails for a reason that may pass (a dropped connection, a timeout, throttling, a server error) is
tried again with exponential backoff, at most `TRIES` times within `ENCODER_TRAIN_RETRY_SECONDS` (default 60);
an error that persists, or one that will not pass (a missing bucket or object, refused credentials), becomes a
UserError naming the object.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from encoder_train.data.formats import kinds, suffixes
from encoder_train.errors import UserError, require
from encoder_train.urls import CREDENTIALS, credentials_refusal, is_remote, local_path, protocol_of, redact

RETRY_SECONDS_ENV = "ENCODER_TRAIN_RETRY_SECONDS"
RETRY_SECONDS = 60.0  # default total time one request keeps being retried
TRIES = 6  # at most: the first try, then waits of 0.5, 1, 2, 4, 8 s
FIRST_WAIT = 0.5

# The protocols whose library is an extra of encoder-train: (module, extra).
EXTRAS = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "hf": ("huggingface_hub", "hf-hub"),
}

T = TypeVar("T")

_fs_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # a lock held by another thread at a fork would stay held in the child
    os.register_at_fork(after_in_child=lambda: globals().__setitem__("_fs_lock", threading.Lock()))


def canonical(location: str | Path) -> str:
    """One spelling per folder, to tell whether a resumed source reads the folder it read before: a URL without
    its trailing slash, a path made absolute (`file://` URLs too)."""
    if is_remote(location):
        return str(location).rstrip("/")
    return os.path.abspath(local_path(location))


def relative(path: str, root: str) -> str:
    """`path` relative to the data folder `root` (a URL or a path); `path` itself when it is not under it."""
    if is_remote(root):
        base = root.rstrip("/") + "/"
        return path[len(base):] if path.startswith(base) else path
    p, r = Path(path), Path(local_path(root))
    return str(p.relative_to(r)) if p.is_relative_to(r) else path


def env_number(name: str, default: float, unit: str) -> float:
    """A finite number >= 0 from the environment variable `name` (`default` when unset or blank); anything else
    (text, a negative number, inf, nan) is one sentence naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"{name}={raw!r} is not a finite number of {unit} >= 0; set e.g. {name}={default:g}, or "
                        "unset it.")
    return value


def retry_seconds() -> float:
    return env_number(RETRY_SECONDS_ENV, RETRY_SECONDS, "seconds")


# Errors of the network libraries that retrying cannot fix, by class name (their modules are optional).
NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                  "DefaultCredentialsError"}
BAD_REQUEST = {"ParamValidationError", "InvalidRegionError", "InvalidS3AddressingStyleError"}


@functools.cache
def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors that may pass: the OS's (connection refused or reset, timeouts), and the network libraries' own."""
    kinds: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("aiohttp", "ClientError"),
                         ("requests", "RequestException"), ("httpx", "HTTPError"), ("httpx2", "HTTPError"),
                         ("google.auth.exceptions", "TransportError")):
        try:
            kinds.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(kinds)


# HTTP answers that may pass: a timeout, throttling, a server error. Any other status is the request's fault.
RETRY_STATUS = {408, 429, *range(500, 600)}


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of an error that carries its response (requests', httpx's, huggingface_hub's), else None."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _may_pass(e: BaseException) -> bool:
    """Whether an error, or one it was raised from, may pass: a library wraps the OS's refused connection in its own
    class (huggingface_hub's client, httpx2, raises httpx2.ConnectError from ConnectionRefusedError)."""
    for _ in range(8):  # a chain is a few links long; a cycle must not hang
        if e is None:
            return False
        if isinstance(e, _transient_errors()) or _http_status(e) in RETRY_STATUS:
            return True
        e = e.__cause__ or e.__context__
    return False


def _reason(e: BaseException) -> str:
    """An error as a short clause for a sentence, without anything that looks like credentials."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines())
    text = redact(text)  # user:secret@ or ?token= in a URL
    text = text.rstrip(". ")
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def find_shards(data_dir: str | Path | None, flag: str = "--data_dir") -> list[Path]:
    """Every shard (a file whose suffix a format claims: `*.pt`) under `data_dir`, in subfolders too, in a stable
    (sorted) order."""
    if data_dir is None:
        raise UserError(f"no training data given; pass {flag} with a folder of {kinds()} shards.")
    root = Path(local_path(data_dir))
    if root.is_file():
        raise UserError(f"{flag} {root} is a file, not a folder; pass the folder that holds the {kinds()} shards "
                        f"(e.g. {root.parent}).")
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass {flag} with a folder of {kinds()} shards.")
    try:
        found = sorted({p for suffix in suffixes() for p in root.rglob(f"*{suffix}")})
        paths = [p for p in found if p.is_file()]
    except OSError as e:
        raise UserError(f"data folder {root} cannot be searched ({e.strerror}); fix its permissions.") from None
    # A shard that is not a readable file would silently drop out of the data: a link into an unmounted disk, a pipe.
    for p in found:
        if p.is_symlink() and not p.exists():
            raise UserError(f"data file {p} is a symbolic link to {os.readlink(p)}, which does not exist; mount or "
                            "restore its target, or remove the link.")
        if not p.is_file() and not p.is_dir():
            raise UserError(f"data file {p} is not a regular file (a pipe or a device); remove it from {root}.")
    if not paths:
        raise UserError(
            f"data folder {root} holds no {kinds()} files (searched subfolders too); "
            f"write shards with `encoder-train pretokenize` or point {flag} elsewhere."
        )
    return paths


class LocalFile:
    """One local file, open for reads at any offset with pread(2) (no shared file position, no memory map)."""

    def __init__(self, path: str):
        self._fd: int | None = os.open(path, os.O_RDONLY)  # OSError: the caller says which file

    def read(self, offset: int, length: int) -> bytearray:
        """Bytes [offset, offset + length), fewer where the file ends first; OSError as the OS raises it."""
        buf = bytearray(length)
        got = os.preadv(self._fd, [buf], offset)
        return buf if got == length else buf[:got]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LocalStore:
    """A local folder (a path, or a `file://` URL), read as it always was."""

    remote = False

    def __init__(self, root: str | Path, flag: str):
        self.root, self.flag = local_path(root), flag

    def list(self) -> list[tuple[str, int]]:
        """(path, size) of every shard under the root, in find_shards' order (by path relative to the root)."""
        listed = []
        for p in find_shards(self.root, self.flag):
            try:
                listed.append((str(p), p.stat().st_size))
            except OSError as e:  # gone since the folder was searched
                raise UserError(f"data file {p} can no longer be read ({e.strerror}); restore it.") from None
        return listed

    def open(self, path: str) -> LocalFile:
        return LocalFile(path)

    def read_whole(self, path: str, denied_is_absent: bool = False) -> bytes | None:
        """A small file's bytes (a manifest), or None when there is none (or, with `denied_is_absent`, when it may
        not be read)."""
        try:
            return Path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except PermissionError:
            if denied_is_absent:
                return None
            raise UserError(f"file {path} cannot be read (permission denied); fix its permissions.") from None
        except OSError as e:
            raise UserError(f"file {path} cannot be read ({e.strerror}); fix its permissions.") from None


class RemoteFile:
    """One object of a RemoteStore: ranged reads, each retried as the store's module says."""

    def __init__(self, store: RemoteStore, url: str):
        self.store, self.url = store, url

    def read(self, offset: int, length: int, where: str = "") -> bytes:
        return self.store.read(self.url, offset, length, where)

    def close(self) -> None:
        pass


class RemoteStore:
    """Shards under an fsspec URL. The filesystem object is made once per process (after a fork the parent's is
    unusable), from the protocol's own environment and files; the store itself pickles as its URL."""

    remote = True

    def __init__(self, root: str, flag: str):
        refused = credentials_refusal(root, flag, "the command line")
        if refused:
            raise UserError(refused)
        self.root = root.rstrip("/")
        self.flag = flag
        self.protocol = protocol_of(root)
        if self.protocol in EXTRAS:
            module, extra = EXTRAS[self.protocol]
            require(module, extra, f"reading {self.root}")
        import fsspec

        try:
            self._cls = fsspec.get_filesystem_class(self.protocol)
        except ValueError:
            raise UserError(f"{flag} {self.root} uses the protocol {self.protocol}://, which no storage library "
                            "knows; give a local folder, or an s3://, gs://, hf:// or other fsspec URL.") from None
        except ImportError as e:
            raise UserError(f"{flag} {self.root} needs a storage library that is not installed "
                            f"({_reason(e).split(': ', 1)[-1]}); install it.") from None
        self._base = self._cls._strip_protocol(root).rstrip("/")
        self._fs: Any = None
        self._pid: int | None = None
        self.top_files: set[str] | None = None  # the names directly under the root, once listed (a manifest's)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": None}

    @property
    def fs(self) -> Any:
        if self._pid != os.getpid():
            with _fs_lock:  # the reading threads may all ask at once
                if self._pid != os.getpid():
                    options: dict[str, Any] = {}
                    if self.protocol in ("s3", "s3a"):
                        # encoder-train retries (see the module); botocore's own retries would multiply the wait.
                        options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 20,
                                                    "read_timeout": 60}
                    self._fs = self._cls(skip_instance_cache=True, **options)
                    self._pid = os.getpid()
        return self._fs

    def _credentials(self) -> str:
        return CREDENTIALS.get(self.protocol, "the storage library's credentials (its environment variables or files)")

    def url(self, fs_path: str) -> str:
        return self.root + fs_path[len(self._base):]

    def fs_path(self, url: str) -> str:
        return self._base + url[len(self.root):]

    def list(self) -> list[tuple[str, int]]:
        """(URL, size) of every shard object under the root, ordered by path relative to the root."""
        found = self.retry(f"data folder {self.root}", lambda: self.fs.find(self._base, detail=True), listing=True)
        if self._base in found and found[self._base].get("type") != "directory":
            parent = self.root.rsplit("/", 1)[0]
            raise UserError(f"{self.flag} {self.root} is a file, not a folder; pass the folder that holds the "
                            f"{kinds()} shards (e.g. {parent}).")
        entries = []
        self.top_files = set()
        for path, info in found.items():
            if path.startswith(self._base + "/") and "/" not in path[len(self._base) + 1:]:
                self.top_files.add(path[len(self._base) + 1:])
            shard = path.endswith(suffixes()) and info.get("type", "file") == "file"
            if not shard or not path.startswith(self._base + "/"):
                continue
            rel = path[len(self._base) + 1:]
            entries.append((tuple(rel.split("/")), self.url(path), int(info.get("size") or 0)))
        if not entries:
            raise UserError(f"data folder {self.root} holds no {kinds()} files (searched subfolders too); upload "
                            f"shards written by `encoder-train pretokenize` there, or point {self.flag} elsewhere.")
        return [(url, size) for _, url, size in sorted(entries)]

    def open(self, url: str) -> RemoteFile:
        return RemoteFile(self, url)

    def read_whole(self, url: str, denied_is_absent: bool = False) -> bytes | None:
        """A small object's bytes (a manifest), or None when there is none: one request. `url` may lie outside
        the root (a manifest one folder up); `denied_is_absent`: None when the store refuses it too (credentials
        scoped to the root's prefix: S3 answers 403, not 404, for a missing key outside what they may list)."""
        path = self._cls._strip_protocol(url)

        def fetch() -> bytes | None:
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None
            except PermissionError:
                if denied_is_absent:
                    return None
                raise

        return self.retry(f"file {url}", fetch)

    def read(self, url: str, start: int, length: int, where: str = "") -> bytes:
        """Bytes [start, start + length) of an object (fewer where it ends first)."""
        if length <= 0:
            return b""
        path = self.fs_path(url)
        return self.retry(f"data file {url}{where}", lambda: self.fs.cat_file(path, start=start, end=start + length))

    def retry(self, what: str, call: Callable[[], T], listing: bool = False) -> T:
        """`call()`, tried again with backoff while its error may pass; a UserError naming `what` otherwise."""
        budget = retry_seconds()
        began, wait = time.monotonic(), FIRST_WAIT
        for attempt in range(1, TRIES + 1):
            try:
                return call()
            except UserError:
                raise
            except FileNotFoundError:
                if listing:
                    raise UserError(f"{what} cannot be listed: its bucket (or repository, or container) does not "
                                    f"exist; check the URL given to {self.flag}.") from None
                raise UserError(f"{what} is gone from the store (it was listed when its folder was scanned); "
                                "restore it.") from None
            except PermissionError:
                raise UserError(f"{what} cannot be read: the store refused the credentials or denied access; check "
                                f"{self._credentials()}.") from None
            except Exception as e:
                names = {k.__name__ for k in type(e).__mro__}
                if names & NO_CREDENTIALS:
                    raise UserError(f"{what} cannot be read: no credentials were found ({_reason(e)}); set "
                                    f"{self._credentials()}.") from None
                if names & BAD_REQUEST:
                    raise UserError(f"{what} cannot be read: the store's library refused the request "
                                    f"({_reason(e)}); check the URL given to {self.flag}.") from None
                status = _http_status(e)
                if status is not None and status not in RETRY_STATUS:
                    raise UserError(f"{what} cannot be read: the store answered HTTP {status} ({_reason(e)}); check "
                                    f"the URL given to {self.flag} and {self._credentials()}.") from None
                if not _may_pass(e):
                    raise
                last = e
                elapsed = time.monotonic() - began
                if attempt == TRIES or elapsed + wait > budget:
                    break
                time.sleep(wait)
                wait *= 2
        elapsed = time.monotonic() - began
        tries = f"{attempt} {'try' if attempt == 1 else 'tries'} in {elapsed:.0f} s"
        raise UserError(f"{what} could not be read ({_reason(last)}; {tries}, within the {budget:g} s that "
                        f"{RETRY_SECONDS_ENV} allows); check the network and the store.")


def open_store(root: str | Path, flag: str) -> LocalStore | RemoteStore:
    """The store of a data folder: a path or a `file://` URL is local, any other URL is read through fsspec."""
    return RemoteStore(str(root), flag) if is_remote(root) else LocalStore(root, flag)
