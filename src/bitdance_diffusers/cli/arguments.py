"""The `bitdance` command's parser class, its argument types and its error type.

Every value is checked while the command line is parsed, before anything heavy is imported: a bad one ends the command
with exit status 2 and one line that names the option, what it got and what it accepts.
"""

import argparse
import math


class UsageError(ValueError):
    """A mistake in the user's input (an argument, a file, the machine they asked for); the message names the fix."""


class CommandLineParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are a single line (no usage block) that says where the options are.

    ``subcommands`` maps the name of each sub-command to its parser, for errors found after parsing.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.subcommands: dict[str, CommandLineParser] = {}

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class LaidOutTextFormatter(argparse.HelpFormatter):
    """Wraps the options' help as usual, and prints the description and the epilog as written (laid out by hand)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _number(text: str, kind: type, description: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number of at least 1 (steps, images, sizes)."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """A real number; ``nan`` and ``inf`` are refused (a NaN guidance scale would silently disable guidance)."""
    value = _number(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def seed(text: str) -> int:
    """A generator seed: a whole number in [0, 2**64 - 1], the range `torch.Generator.manual_seed` takes."""
    value = _number(text, int, "a whole number")
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {value}")
    return value


def prompt_text(text: str) -> str:
    """A prompt with at least one visible character."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; describe what to draw")
    return text


def class_label(text: str) -> int | str:
    """An ImageNet class id ("980") or label name ("golden retriever")."""
    if text.lstrip("-").isdigit():
        if int(text) < 0:
            raise argparse.ArgumentTypeError(f"class ids start at 0, got {text}")
        return int(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty class label; give a class id or an ImageNet label name")
    return text
