"""Paths given as URLs, and the secrets a URL may carry.

Every flag and config key that takes a path tells a URL (`scheme://...`) from a path with `is_url`. Only data
folders are read from a URL (data/store.py); every other path refuses one in a sentence (`--checkpoint_dir
s3://bucket/ck` would otherwise write a local folder named `s3:`).

A URL may carry credentials: in its userinfo (`s3://KEY:SECRET@bucket/...`) or in its query (`?token=...`,
`?X-Amz-Signature=...`). Such a URL is refused, since the config is printed, stored in every checkpoint and sent to
trackers; and `redact` hides them (`s3://***@bucket/ck`, `?token=***`) in every text shown to a person: each
UserError's message passes through it.
"""

from __future__ import annotations

import re
from pathlib import Path

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# scheme://user@ or scheme://user:secret@ (an AWS secret key may hold slashes), anywhere in a text; a quote or a
# space ends a URL in a message.
_USERINFO = re.compile(r"""\b([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/@\s'"]*@|[^\s'"/]*:[^\s'"]*@)""")
# A query parameter whose name says it holds a secret: token, api_key, X-Amz-Signature, sig (Azure SAS), ...
_SECRET_PARAM = re.compile(
    r"""([?&;][^=&#\s'"]*(?:token|key|secret|passw|pwd|signature|sig|credential|auth|session)[^=&#\s'"]*=)"""
    r"""[^&;#\s'"]+""",
    re.IGNORECASE,
)

# What a refused request (or a URL carrying credentials) should make the user check, by protocol.
CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an S3-compatible store) or ~/.aws",
    "s3a": "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an S3-compatible store) or ~/.aws",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
    "hf": "HF_TOKEN or `hf auth login`",
}

# The keys and flags that read a URL; every other path refuses one.
DATA_FOLDERS = "data folders (data_dir and val_data_dir, and those of data.sources; evaluate's --data_dir)"


def is_url(location: object) -> bool:
    """Whether a path is given as a URL (`s3://...`, `file://...`)."""
    return isinstance(location, str) and _URL.match(location) is not None


def protocol_of(url: str) -> str:
    return _URL.match(url).group(1).lower()


def redact(text: str) -> str:
    """`text` with every URL's credentials replaced by `***`: `s3://***@bucket/ck`, `...?token=***`."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def has_credentials(location: object) -> bool:
    return isinstance(location, str) and redact(location) != location


def local_only(location: object) -> str | None:
    """Why `location` cannot stand where only a local path is read, as a clause (`is a URL, but ...`) that does not
    repeat it; None for a path."""
    if not is_url(location):
        return None
    if protocol_of(location) == "file":
        return f"is a file:// URL, but this takes a local path: write it as {location[len('file://'):]}"
    return f"is a URL, but this takes a local path; only {DATA_FOLDERS} are read from object storage"


def with_credentials(location: object) -> str | None:
    """Why a data URL carrying credentials is refused, as a clause that does not repeat it; None when it carries
    none."""
    if not has_credentials(location):
        return None
    return ("carries credentials in its URL (user:secret@ or a token in its query); remove them and give them "
            "through the storage library's environment or files (docs/data.md), so that they never reach logs or "
            "checkpoints")


def is_remote(location: str | Path | None) -> bool:
    """A URL read through fsspec (not `file://`, which is a local folder)."""
    return is_url(location) and protocol_of(location) != "file"


def local_path(location: str | Path) -> str:
    """The local path of a folder given as a path or a `file://` URL."""
    text = str(location)
    return text[len("file://"):] if is_url(text) and protocol_of(text) == "file" else text


def credentials_refusal(location: str | None, key: str, source: str) -> str | None:
    """The sentence that refuses a data URL carrying credentials (`s3://KEY:SECRET@bucket/...`, `?token=...`), or
    None when it carries none: the config is printed, stored in every checkpoint and sent to trackers. The sentence
    shows the URL with them as `***`. A sentence, not a raise: errors.py imports this module (UserError redacts)."""
    if not (location and is_url(location) and has_credentials(location)):
        return None
    where = CREDENTIALS.get(protocol_of(location), "the storage library's own environment variables or files")
    return (f"{source}: {key} {redact(location)} carries credentials in its URL (user:secret@ or a token in its "
            f"query); remove them from the URL and give them through {where} instead, so that they never reach logs "
            "or checkpoints.")
