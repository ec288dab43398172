"""The one exception type for user mistakes.

A `UserError` carries a single sentence for a person: what is wrong (naming the file, key or value)
and what to do. The CLI prints it to stderr and exits with code 2, without a traceback. Any other
exception is our bug and keeps its traceback.
"""

from encoder_train.urls import redact


class UserError(Exception):
    """A mistake the user can fix: bad file, bad config value, mismatched checkpoint, ...

    Its message never shows a secret: credentials in any URL it quotes are replaced by `***` (urls.redact), so no
    message, log line or tracker record repeats one, whichever value it names."""

    exit_code = 2

    def __init__(self, message: object = "") -> None:
        super().__init__(redact(str(message)))


def install_hint(extra: str) -> str:
    """The pip command that adds an optional extra to this installation: `pip install -e '<clone>[extra]'` where
    encoder-train was installed from a clone (editable, as quickstart.sh and .ci/run do), else from PyPI."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        direct = metadata.distribution("encoder-train").read_text("direct_url.json")
    except metadata.PackageNotFoundError:  # run from a source tree on PYTHONPATH
        return f"pip install -e '.[{extra}]' (in your clone of encoder-train)"
    try:
        info = json.loads(direct) if direct else {}
    except ValueError:
        info = {}
    if info.get("dir_info", {}).get("editable") and info.get("url", "").startswith("file://"):
        return f"pip install -e '{unquote(urlparse(info['url']).path)}[{extra}]'"
    return f"pip install 'encoder-train[{extra}]'"


def require(module: str, extra: str, feature: str):
    """Import an optional dependency, or stop with the one command that installs the extra providing it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{feature} needs the {module.split('.')[0]} package, which is not installed; "
                        f"{install_hint(extra)} adds it.") from None
