"""What every hone command shares: the consoles, the error exit, and the errors that mean "bad input"."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.markup import escape

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input (config, data, model path, options) cannot be used: exit 2."""
    from hone.config import ConfigError
    from hone.data.readers import DataError
    from hone.data.template import TemplateError
    from hone.models.load import ModelError
    from hone.train.prepare import DataProblems
    from hone.train.run import RunError

    return (ConfigError, DataError, DataProblems, ModelError, RunError, TemplateError, FileNotFoundError)


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    # peft asks transformers a deprecated question on every wrap; users can do nothing about it.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
