"""edgelm's error family. Every message says what was wrong and what to do; the CLI prints it on one
line without a traceback and exits with :attr:`EdgeLMError.exit_code`."""

from __future__ import annotations


class EdgeLMError(Exception):
    """Base of all edgelm errors. ``exit_code`` 2: bad input or environment (nothing was written)."""

    exit_code = 2


class ProfileError(EdgeLMError):
    """Unknown device, or a device profile TOML that does not match the schema."""


class RecipeError(EdgeLMError):
    """CLI overrides that the profile or the formats cannot satisfy (format not allowed, scheme unknown)."""


class ModelError(EdgeLMError):
    """Missing or corrupt model directory, or an architecture edgelm cannot export."""


class DataError(EdgeLMError):
    """Unreadable data file, unknown format, no text column, bad labels."""


class RuntimeMissingError(EdgeLMError):
    """A converter or runtime package is not installed."""


def export_stack_missing(missing: str) -> RuntimeMissingError:
    """The error for a command that needs the export stack on the runtime install (``missing``: the packages
    not installed, e.g. ``"torch"``)."""
    return RuntimeMissingError(
        f"this command needs the export stack ({missing} not installed): pip install 'edgelm[export]'"
    )


class ExportError(EdgeLMError):
    """A converter failed on the model (unsupported op, shape problem); the message names the format."""


class OutputError(EdgeLMError):
    """An output location edgelm must not or cannot write: a file where a folder goes, a folder that is not
    writable, a symlink where results go (never followed or deleted)."""


class ValidationError(EdgeLMError):
    """A runner failed to run an artifact (crash, timeout, missing output)."""


class BudgetError(EdgeLMError):
    """The accuracy-budget search found no candidate within the budgets; the message names the closest.
    Exit code 1, like a missed gate: the input was fine, the budget cannot be met."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) turned into the KeyboardInterrupt path: what was half-written is removed. The CLI
    exits with ``exit_code`` (128 + the signal number)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.exit_code = 128 + signum
